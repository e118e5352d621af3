"""A run's journal on disk: what completed survives the kernel.

``parallel_map(..., journal=PATH)`` (and ``%%shm_parallel``, which journals
by default) records, as the ledger of the :class:`~.run.Run` learns of
completed chunks, their items' results and the state of the ``out=``
arrays. A later call of the same run (in a new kernel, after a crash or a
restart) finds the journal, says ``resuming: 4380 of 8760 items recorded
12 min ago``, runs only the items not recorded and returns what an
uninterrupted run returns. Where the data flows::

    workers ──ChunkResult──► Run._take ──► Journal.took (a list append)
                                   │
     wait loop, every FLUSH_SECONDS ▼
     Journal.flush: results of the taken chunks (stacked rows as one array,
       other values pickled) + out= blocks that changed since the last
       flush (64 KiB blocks, found by XXH3-64 of each block)
       ──► ONE record appended: [tag, kind, items, length, XXH3-64][payload]
       ──► fdatasync

The format is the smallest correct one: one append-only file, a header
record, then one *commit* record per flush, each checksummed and written
with one ``write``. A record is whole or it is not there: a process killed
in the middle of a write leaves a torn tail, which the next reader notices
(its length runs past the end or its checksum fails), reports in one
warning and cuts off; its items run again. Damage anywhere else (a bad
signature or header, a record that fails its checksum before the last) is
a :class:`~shm_kernel_safe.errors.JournalError`: never trusted, never
merged. An item is recorded only together with the ``out=`` bytes of the
same moment, in the same record, so a record's items always have their
writes; ``out=`` blocks hold absolute bytes, so replaying the records in
order onto the arrays the run started from gives that moment's state.

Why not the alternatives (one flush measured on this project's ext4
disk, 400 items and 70 KB of ``out=`` bytes: this file with
``fdatasync`` 0.4 ms, SQLite in WAL mode with ``synchronous=FULL`` 0.6 ms,
an ``.npy`` memmap plus done bitmap with ``msync`` 0.6-0.9 ms; all
negligible at one flush a second): SQLite gives the same atomic commit,
but its rows would hold the same pickled values and blocks, in a
database file plus its WAL and shared-memory files, for nothing this file
lacks; a memmap plus bitmap updated in place needs three files whose
writes must reach the disk in order, cannot hold results that do not
stack, and has no checksum to tell damage from data; zarr is a dependency
for chunked arrays we would use as a blob store. On the seed workload the
parent spends 1.2-1.5 % of a call in the journal
(``benchmarks/bench_journal.py``, ``docs/benchmarks.md``).

Crash bound: an item recorded is never run again; at most the items that
completed since the last flush (``FLUSH_SECONDS``, longer when a flush is
slow: the interval is kept at 50 times the flush's own cost, so that
journaling costs at most ~2 %) plus the items of the chunks running at the
kill run again. With a journal the plan cuts chunks of at most
``CHUNK_SECONDS`` of work (timed on the probe), so that bound is a few
seconds of work per worker.

What makes two runs the same run (the journal's *key*, in its header): the
function's code (:func:`~.resume.fingerprint_function`), the items'
fingerprint, the number of items, a digest of every value the function
reads (its globals, closure and defaults; arrays by their XXH3-128 digest),
and the shape, dtype and starting bytes of each ``out=`` array (or, run
again in the same process, the bytes they held when the journaled run
stopped, recorded by its last flush). A journal whose key differs says
which part differs and is refused.
"""

from __future__ import annotations

import contextlib
import functools
import os
import pickle
import struct
import sys
import tempfile
import time
import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import cloudpickle
import numpy as np
import xxhash

from .. import _checks
from .._platform import journal_directory
from .._text import human_bytes
from ..errors import InvalidArgumentError, JournalError, JournalWarning
from ..memory.digest import hexdigest
from ..memory.janitor import JOURNAL_SUFFIX, in_use, remove_old_journals
from ..memory.janitor import held_journals as _held
from .callsite import warn_at_caller
from .resume import Prior, RunRecord, fingerprint_function, fingerprint_items, new_run_id

#: First bytes of every journal file: a signature and the format's version.
SIGNATURE = b"SKS-JOURNAL-1\n"
#: A record's frame: tag, kind, items recorded, payload length, XXH3-64 of the payload.
_FRAME = struct.Struct("<4sIQQQ")
_TAG = b"SKSR"
HEADER, COMMIT = 1, 2
#: Seconds between flushes at least (longer when a flush is slow, see the module).
FLUSH_SECONDS = 1.0
#: The flush interval is at least this many times the last flush's cost.
FLUSH_COST_FACTOR = 50
#: Work per chunk, at most, in a journaled run (timed on the probe).
CHUNK_SECONDS = 2.0
#: out= arrays are compared and recorded in blocks of this many bytes.
BLOCK_BYTES = 1 << 16


# -- the key: what makes two runs the same run ------------------------------------


def run_key(fn: Any, items: Any, outputs: tuple[np.ndarray, ...]) -> dict[str, Any]:
    """The journal key of a run of ``fn`` over ``items`` writing ``outputs``."""
    return {
        "function": fingerprint_function(fn),
        "items": fingerprint_items(items),
        "n_items": len(items),
        "inputs": input_digests(fn, outputs),
        "outputs": [[list(o.shape), o.dtype.str, hexdigest(o)] for o in outputs],
    }


def input_digests(fn: Any, outputs: tuple[np.ndarray, ...] = ()) -> dict[str, str]:
    """XXH3-128 digest of each value ``fn`` reads, by name (``out=`` arrays left out).

    Globals the code names, closure variables and defaults; functions
    reached that way count with their code and their own inputs, a few
    levels deep. Arrays are digested by content (at memory speed), other
    values by their pickle with arrays inside digested out of band.
    """
    found: dict[str, str] = {}
    _inputs_of(fn, "", found, {id(o) for o in outputs}, 3, set())
    return found


def _code_names(code: types.CodeType) -> set[str]:
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _code_names(const)
    return names


def _inputs_of(
    fn: Any, prefix: str, found: dict[str, str], outs: set[int], depth: int, seen: set[int]
) -> None:
    if id(fn) in seen:
        return
    seen.add(id(fn))
    target = getattr(fn, "__func__", fn)
    code = getattr(target, "__code__", None)
    if not isinstance(code, types.CodeType):
        # a partial, a callable object: its whole state is its input
        found[f"{prefix}<the function's data>"] = _value_digest(fn, outs, depth, seen)
        return
    values: dict[str, Any] = {}
    globs = getattr(target, "__globals__", {}) or {}
    for name in sorted(_code_names(code)):
        if name in globs:
            values[name] = globs[name]
    for var, cell in zip(
        code.co_freevars, getattr(target, "__closure__", None) or (), strict=False
    ):
        with contextlib.suppress(ValueError):
            values[var] = cell.cell_contents
    for k, default in enumerate(getattr(target, "__defaults__", None) or ()):
        values[f"<default {k}>"] = default
    for name, default in (getattr(target, "__kwdefaults__", None) or {}).items():
        values[f"<default {name}>"] = default
    for name, value in values.items():
        if isinstance(value, types.ModuleType):
            continue
        if _is_out(value, outs):
            continue
        if isinstance(value, types.FunctionType) and depth > 0:
            if getattr(value, "__module__", None) in sys.modules and _importable(value):
                found[prefix + name] = f"{value.__module__}.{value.__qualname__}"
                continue
            found[prefix + name] = fingerprint_function(value)
            _inputs_of(value, f"{prefix}{name}.", found, outs, depth - 1, seen)
            continue
        found[prefix + name] = _value_digest(value, outs, depth, seen)


def _importable(fn: types.FunctionType) -> bool:
    module = sys.modules.get(fn.__module__)
    return (
        module is not None
        and fn.__module__ not in ("__main__", "__shm_parallel__")
        and getattr(module, fn.__name__, None) is fn
    )


def _is_out(value: Any, outs: set[int]) -> bool:
    if not isinstance(value, np.ndarray):
        return False
    while isinstance(value, np.ndarray):
        if id(value) in outs:
            return True
        value = value.base
    return False


class _DigestPickler(cloudpickle.Pickler):
    """cloudpickle with numeric arrays replaced by their content digest."""

    def __init__(self, file: Any, outs: set[int]) -> None:
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self.outs = outs

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, np.ndarray) and not obj.dtype.hasobject:
            if _is_out(obj, self.outs):
                return str, ("<out>",)
            return str, (f"{obj.shape} {obj.dtype.str} {hexdigest(obj)}",)
        if isinstance(obj, (set, frozenset)):
            # a set of strings pickles in another order in another process
            with contextlib.suppress(TypeError):
                return type(obj), (sorted(obj),)
        return super().reducer_override(obj)


def _value_digest(value: Any, outs: set[int], depth: int, seen: set[int]) -> str:
    if isinstance(value, np.ndarray) and not value.dtype.hasobject:
        return f"{value.shape} {value.dtype.str} {hexdigest(value)}"
    import io

    buf = io.BytesIO()
    try:
        _DigestPickler(buf, outs).dump(value)
    except Exception:  # cannot be pickled: only its type can be compared
        return f"<{type(value).__qualname__}>"
    return xxhash.xxh3_128_hexdigest(buf.getvalue())


def _differs(was: dict[str, Any], now: dict[str, Any]) -> str | None:
    """What differs between two keys, in a few words, or None."""
    if was.get("n_items") != now["n_items"]:
        return f"its run had {was.get('n_items')} items, this one has {now['n_items']}"
    if was.get("items") != now["items"]:
        return "its items differ from these (the same count, other values)"
    if was.get("function") != now["function"]:
        return "it was recorded by other code (the function or the cell's text changed)"
    old, new = was.get("inputs", {}), now["inputs"]
    changed = sorted(n for n in set(old) | set(new) if old.get(n) != new.get(n))
    if changed:
        names = ", ".join(changed[:3]) + (", ..." if len(changed) > 3 else "")
        return f"the values the function reads changed ({names})"
    was_out = was.get("outputs", [])
    if len(was_out) != len(now["outputs"]):
        return f"its run wrote {len(was_out)} out= array(s), this one {len(now['outputs'])}"
    for k, (a, b) in enumerate(zip(was_out, now["outputs"], strict=True)):
        if a[:2] != b[:2]:
            return f"out= array {k} was {tuple(a[0])} {np.dtype(a[1])}, now {tuple(b[0])} " + str(
                np.dtype(b[1])
            )
    return None


# -- reading ---------------------------------------------------------------------


@dataclass
class Contents:
    """What a journal file holds: its header and its valid commits."""

    header: dict[str, Any]
    commits: list[dict[str, Any]]
    end: int  # offset just past the last valid record
    torn: int  # bytes of a torn tail cut off (0: none)
    recorded: int  # items recorded


def _frames(data: bytes | memoryview, path: str) -> Any:
    """(kind, items, payload offset, length, ok) of each record, and where a torn tail starts."""
    if bytes(data[: len(SIGNATURE)]) != SIGNATURE:
        raise JournalError(path, "is damaged or not a journal (its signature is wrong)")
    pos = len(SIGNATURE)
    size = len(data)
    while pos < size:
        if size - pos < _FRAME.size:
            yield None, pos
            return
        tag, kind, count, length, check = _FRAME.unpack_from(data, pos)
        start = pos + _FRAME.size
        if tag != _TAG or start + length > size:
            yield None, pos
            return
        ok = xxhash.xxh3_64_intdigest(data[start : start + length]) == check
        yield (kind, count, start, length, ok), start + length
        pos = start + length


def read(path: str, *, payloads: bool = True) -> Contents:
    """The header and valid commits of the journal at ``path``.

    Raises :class:`JournalError` when it is damaged anywhere but its last
    record (a torn tail, which is cut off and counted in ``torn``).
    """
    with open(path, "rb") as f:
        data = f.read()
    header: dict[str, Any] | None = None
    commits: list[dict[str, Any]] = []
    end, recorded = len(SIGNATURE), 0
    frames = list(_frames(data, path))
    for n, (frame, after) in enumerate(frames):
        last = n == len(frames) - 1
        if frame is None or not frame[4]:
            if not last:
                raise JournalError(path, f"is damaged (record {n} fails its checksum)")
            if header is None:
                raise JournalError(path, "is damaged (its header is incomplete)")
            return Contents(header, commits, end, len(data) - end, recorded)
        kind, count, start, length, _ = frame
        if n == 0:
            if kind != HEADER:
                raise JournalError(path, "is damaged (it does not start with its header)")
            header = pickle.loads(data[start : start + length])
        elif kind == COMMIT:
            recorded += count
            if payloads:
                commits.append(pickle.loads(data[start : start + length]))
        end = after
    if header is None:
        raise JournalError(path, "is damaged (it has no header)")
    return Contents(header, commits, end, 0, recorded)


def recorded_mask(path: str) -> np.ndarray:
    """One bool per item of the journal at ``path``: True where it records the item done."""
    contents = read(path)
    done = np.zeros(int(contents.header["key"]["n_items"]), dtype=bool)
    for commit in contents.commits:
        for idx, _, _ in commit.get("stacked", ()):
            done[idx] = True
        done[list(commit.get("values", {}))] = True
    return done


# -- the journal of one run ------------------------------------------------------


def _flat_bytes(arr: np.ndarray) -> np.ndarray | None:
    """``arr``'s bytes as a 1-d uint8 view, in logical order (None: not contiguous)."""
    if arr.flags.c_contiguous:
        return arr.reshape(-1).view(np.uint8)
    if arr.flags.f_contiguous:
        return arr.T.reshape(-1).view(np.uint8)
    return None


def _block_hashes(flat: np.ndarray) -> np.ndarray:
    n = -(-flat.size // BLOCK_BYTES)
    out = np.empty(n, dtype=np.uint64)
    view = memoryview(flat)
    for b in range(n):
        out[b] = xxhash.xxh3_64_intdigest(view[b * BLOCK_BYTES : (b + 1) * BLOCK_BYTES])
    return out


def _age(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.0f} h"
    return f"{seconds / 86400:.0f} days"


def default_path(key_parts: Any, label: str) -> str:
    """A journal path in the per-user cache folder for a run named by ``key_parts``."""
    h = xxhash.xxh3_128_hexdigest(repr(key_parts).encode())[:20]
    safe = "".join(c if c.isalnum() else "-" for c in label)[:40].strip("-") or "run"
    return os.path.join(journal_directory(), f"{safe}-{h}{JOURNAL_SUFFIX}")


class Journal:
    """The journal of one run: opened (or created) before it starts,
    fed by the run's ledger, finished or left behind when it ends."""

    def __init__(self, path: str, key: dict[str, Any], label: str, keep: bool) -> None:
        self.path = path
        self.key = key
        self.label = label
        self.keep = keep
        self.fd: int | None = None
        self.end = 0
        self.off = False
        self.n = key["n_items"]
        self.recorded = np.zeros(self.n, dtype=bool)
        self.pending: list[tuple[Any, Any]] = []  # (ChunkResult, Chunk) taken, not flushed
        self.prior_pending: list[tuple[np.ndarray, list]] = []
        self.hashes: list[np.ndarray] = []
        self.next_flush = 0.0
        self.interval = FLUSH_SECONDS
        self.prior: Prior | None = None
        self.outputs: tuple[np.ndarray, ...] = ()

    # -- opening -------------------------------------------------------------------
    @classmethod
    def open(
        cls,
        path: str | os.PathLike | bool,
        fn: Any,
        items: Any,
        outputs: tuple[np.ndarray, ...],
        *,
        keep: bool = False,
        label: str | None = None,
    ) -> Journal | None:
        """The journal of this run at ``path`` (True: the per-user cache
        folder), resumed when it records this very run.

        Replays the recorded ``out=`` state into ``outputs`` and prints the
        one ``resuming:`` line. Raises :class:`JournalError` for a journal
        of another run or a damaged one; returns None (after one
        :class:`JournalWarning`) when no journal can be written here.
        """
        for k, arr in enumerate(outputs):
            if _flat_bytes(arr) is None:
                raise InvalidArgumentError(
                    "journal",
                    f"needs out= arrays that are contiguous; out[{k}] is a strided view "
                    f"(pass the array it views)",
                )
        key = run_key(fn, items, outputs)
        label = (
            label
            or getattr(fn, "__shm_journal_label__", None)
            or getattr(fn, "__qualname__", type(fn).__qualname__)
        )
        if path is True:
            path = default_path((key["function"], key["items"], key["inputs"]), label)
        path = os.path.abspath(os.fspath(path))  # type: ignore[arg-type]
        journal = cls(path, key, label, keep)
        journal.outputs = outputs
        _janitor_ran()
        if os.path.exists(path):
            journal._resume()
        else:
            try:
                journal._create()
            except OSError as exc:
                journal._give_up(exc)
                return None
        journal.hashes = [_block_hashes(_flat_bytes(o)) for o in outputs]  # type: ignore[arg-type]
        journal.next_flush = time.monotonic() + journal.interval
        return journal

    def _create(self) -> None:
        os.makedirs(os.path.dirname(self.path), mode=0o700, exist_ok=True)
        header = {"key": self.key, "label": self.label, "created": time.time(), "pid": os.getpid()}
        payload = pickle.dumps(header, protocol=pickle.HIGHEST_PROTOCOL)
        fd, tmp = tempfile.mkstemp(prefix=".sksj-", dir=os.path.dirname(self.path))
        try:
            _write_all(fd, SIGNATURE + _frame(HEADER, 0, payload))
            _sync(fd)
            _lock(fd, self.path)
            # A journal exists whole, with its header, or not at all; one
            # another process made meanwhile is never replaced (link fails).
            try:
                os.link(tmp, self.path)
                os.unlink(tmp)
            except FileExistsError:
                raise
            except OSError:  # a file system without hard links
                os.replace(tmp, self.path)
        except BaseException:
            os.close(fd)
            _held.discard(self.path)
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        self.fd = fd
        self.end = os.lseek(fd, 0, os.SEEK_END)

    def _resume(self) -> None:
        fd = os.open(self.path, os.O_RDWR)
        try:
            _lock(fd, self.path)
            contents = read(self.path)
        except BaseException:
            os.close(fd)
            if not isinstance(sys.exc_info()[1], JournalError) or "in use" not in str(
                sys.exc_info()[1]
            ):
                _held.discard(self.path)
            raise
        self.fd = fd
        was = contents.header.get("key", {})
        problem = _differs(was, self.key)
        if problem is None:
            problem = self._check_outputs(was, contents)
        if problem is not None:
            self.close()
            raise JournalError(self.path, f"records another run: {problem}")
        if contents.torn:
            os.ftruncate(fd, contents.end)  # never appended after a torn record
            warn_at_caller(
                JournalWarning(
                    f"journal {self.path}: its last record is incomplete (the process was "
                    f"stopped while writing it) and was cut off; its items run again"
                )
            )
        self.end = contents.end
        os.lseek(fd, self.end, os.SEEK_SET)
        self._load(contents)

    def _check_outputs(self, was: dict[str, Any], contents: Contents) -> str | None:
        """None when the out= arrays hold what the journaled run started from,
        or what it had written when it stopped (the same kernel, run again)."""
        at_stop = [c["outputs_at_stop"] for c in contents.commits if "outputs_at_stop" in c]
        for k in range(len(self.outputs)):
            now = self.key["outputs"][k][2]
            if now == was["outputs"][k][2] or (at_stop and at_stop[-1][k] == now):
                continue
            return (
                f"out= array {k} holds neither what its run started from nor what that "
                f"run had written when it stopped"
            )
        return None

    def _load(self, contents: Contents) -> None:
        values: list = [None] * self.n
        done = np.zeros(self.n, dtype=bool)
        for commit in contents.commits:
            for idx, rows, kind in commit.get("stacked", ()):
                for j, i in enumerate(idx.tolist()):
                    values[i] = _stored(rows[j], kind)
                done[idx] = True
            for i, value in commit.get("values", {}).items():
                values[i] = value
                done[i] = True
            for k, offsets, blobs in commit.get("outs", ()):
                flat = _flat_bytes(self.outputs[k])
                for off, blob in zip(offsets.tolist(), blobs, strict=True):
                    flat[off : off + len(blob)] = np.frombuffer(blob, dtype=np.uint8)
        self.recorded = done
        created = contents.header.get("created", time.time())
        last = max([created] + [c.get("time", created) for c in contents.commits])
        recorded = int(done.sum())
        if not recorded:  # killed before its first flush: nothing to say
            return
        record = RunRecord(new_run_id(), self.key["items"], self.key["function"], ())
        self.prior = Prior(done.copy(), values, record)
        print(
            f"resuming: {recorded} of {self.n} items recorded {_age(time.time() - last)} ago "
            f"(journal {self.path})"
        )

    # -- feeding -----------------------------------------------------------------------
    def begin(self, resumed: Prior | None) -> Prior | None:
        """The prior of the run: what the journal recorded, with what a
        ``resume=`` error completed (recorded at the first flush)."""
        if resumed is None:
            return self.prior
        if self.prior is None:
            self.prior = Prior(resumed.done.copy(), list(resumed.values), resumed.record)
        else:
            for i in np.flatnonzero(resumed.done & ~self.prior.done):
                self.prior.values[i] = resumed.values[i]
            self.prior.done |= resumed.done
        extra = np.flatnonzero(self.prior.done & ~self.recorded)
        if len(extra):
            self.prior_pending.append((extra, [self.prior.values[i] for i in extra]))
        return self.prior

    def took(self, res: Any, chunk: Any) -> None:
        """A chunk's result entered the ledger (recorded at the next flush)."""
        if not self.off:
            self.pending.append((res, chunk))

    def tick(self, run: Any) -> None:
        """Flush when it is time (from the run's wait loop)."""
        if not self.off and time.monotonic() >= self.next_flush:
            self.flush(run, run.transport.output_state())

    def flush(self, run: Any, outputs: tuple[np.ndarray, ...] | None, stop: bool = False) -> None:
        """Append one record: the items taken since the last flush, with
        the ``out=`` blocks that changed (read from ``outputs``: where the
        out= state lives now)."""
        if self.off:
            return
        started = time.perf_counter()
        try:
            commit, count, written = self._commit(run, outputs)
            if stop and self.outputs:
                commit["outputs_at_stop"] = [hexdigest(o) for o in self.outputs]
            if count or commit.get("outs") or stop:
                payload = _dumps(commit)
                self._append(_frame(COMMIT, count, payload))
        except Exception as exc:  # a journal never fails the run it records
            self._give_up(exc)
            return
        # Only now that the record is on disk: what it holds counts as
        # recorded. A write stopped by an interrupt leaves all of it to the
        # next flush (the run's last), out= blocks included.
        written()
        cost = time.perf_counter() - started
        self.interval = max(FLUSH_SECONDS, FLUSH_COST_FACTOR * cost)
        self.next_flush = time.monotonic() + self.interval

    def _append(self, record: bytes) -> None:
        """Write one record at the end of the valid data, whole or not at all:
        whatever stops the write (an interrupt, a full disk) leaves no torn
        record before the next one."""
        fd = self.fd
        assert fd is not None
        try:
            os.lseek(fd, self.end, os.SEEK_SET)
            _write_all(fd, record)
            _sync(fd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, self.end)
            raise
        self.end += len(record)

    def _commit(
        self, run: Any, outputs: tuple[np.ndarray, ...] | None
    ) -> tuple[dict, int, Callable[[], None]]:
        """The next record, its count of items newly recorded, and what to
        note once it is written (nothing here changes before that)."""
        pending = list(self.pending)
        prior_pending = list(self.prior_pending)
        positions = run.positions
        stacked_parts: list[tuple[np.ndarray, np.ndarray, str]] = []
        values: dict[int, Any] = {}
        newly: list[np.ndarray] = []
        for extra, vals in prior_pending:
            values.update(zip(extra.tolist(), vals, strict=True))
            newly.append(extra)
        kind = _kind(run.first)
        for res, chunk in pending:
            if res.done <= 0:
                continue
            local = np.arange(chunk.start, chunk.start + res.done)
            if res.failed:
                local = local[~np.isin(local, list(res.failed))]
            if res.values is not None:
                for i in local.tolist():
                    values[_caller(i, positions)] = res.values[i - chunk.start]
            else:
                misfit = np.isin(local, list(res.misfits)) if res.misfits else None
                for i in res.misfits:
                    if chunk.start <= i < chunk.start + res.done and i not in res.failed:
                        values[_caller(i, positions)] = res.misfits[i]
                rows = local if misfit is None else local[~misfit]
                if len(rows):
                    caller = rows if positions is None else positions[rows]
                    stacked_parts.append((caller.astype(np.int64), run.stacked[rows], kind))
            newly.append(local if positions is None else positions[local])
        commit: dict[str, Any] = {"time": time.time()}
        if stacked_parts:
            commit["stacked"] = stacked_parts
        if values:
            commit["values"] = values
        idx = np.unique(np.concatenate(newly)) if newly else np.zeros(0, dtype=np.intp)
        count = int((~self.recorded[idx]).sum())
        hashed: list[tuple[int, int, int]] = []
        if outputs is not None:
            outs = self._changed_blocks(outputs, hashed)
            if outs:
                commit["outs"] = outs

        def written() -> None:
            del self.pending[: len(pending)]
            del self.prior_pending[: len(prior_pending)]
            self.recorded[idx] = True
            for k, b, h in hashed:
                self.hashes[k][b] = h

        return commit, count, written

    def _changed_blocks(
        self, outputs: tuple[np.ndarray, ...], hashed: list[tuple[int, int, int]]
    ) -> list:
        """(array, offsets, bytes) of the blocks that changed since the last
        record; their new hashes go to ``hashed``, noted once written."""
        found = []
        for k, arr in enumerate(outputs):
            flat = _flat_bytes(arr)
            if flat is None:
                flat = _flat_bytes(np.ascontiguousarray(arr))
            view = memoryview(flat)  # type: ignore[arg-type]
            hashes = self.hashes[k]
            offsets, blobs = [], []
            for b in range(len(hashes)):
                block = view[b * BLOCK_BYTES : (b + 1) * BLOCK_BYTES]
                if xxhash.xxh3_64_intdigest(block) == hashes[b]:
                    continue
                blob = bytes(block)  # what is recorded is what is hashed
                hashed.append((k, b, xxhash.xxh3_64_intdigest(blob)))
                offsets.append(b * BLOCK_BYTES)
                blobs.append(blob)
            if offsets:
                found.append((k, np.asarray(offsets, dtype=np.int64), blobs))
        return found

    # -- ending ------------------------------------------------------------------------
    def finish(self, run: Any, ok: bool) -> None:
        """The run ended: a finished run's journal is removed (kept with
        ``keep``); an unfinished one records everything the run completed
        and stays for the next call to resume."""
        if self.off:
            return
        if ok and not self.keep:
            self.close()
            with contextlib.suppress(OSError):
                os.unlink(self.path)
            return
        if run is not None:
            # the out= writes have landed in the caller's arrays
            self.flush(run, self.outputs, stop=True)
        self.close()

    def close(self) -> None:
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.close(self.fd)  # closing releases the lock
            self.fd = None
            _held.discard(self.path)

    def _give_up(self, exc: Exception) -> None:
        """No journal can be written (disk full, no permission): one warning,
        journaling off, the run goes on; what was recorded stays valid."""
        self.off = True
        self.pending = []
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self.fd, self.end)  # a torn record is never left behind
        self.close()
        reason = getattr(exc, "strerror", None) or exc
        warn_at_caller(
            JournalWarning(
                f"journal {self.path}: cannot write ({reason}); journaling is off for this "
                f"run, which goes on"
            )
        )


def _caller(i: int, positions: np.ndarray | None) -> int:
    return i if positions is None else int(positions[i])


def _kind(first: Any) -> str:
    if isinstance(first, (bool, int, float, complex)) and not isinstance(first, np.generic):
        return "python"
    if isinstance(first, np.ndarray):
        return "array"
    return "numpy"


def _stored(row: Any, kind: str) -> Any:
    """A stacked row as the function returned it (see ``results.stored_value``)."""
    if kind == "python":
        return row.item()
    if kind == "array":
        return np.array(row)
    return row[()] if isinstance(row, np.ndarray) else row


def _dumps(obj: Any) -> bytes:
    try:
        return pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception:
        return cloudpickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)


def _frame(kind: int, count: int, payload: bytes) -> bytes:
    return _FRAME.pack(_TAG, kind, count, len(payload), xxhash.xxh3_64_intdigest(payload)) + payload


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _sync(fd: int) -> None:
    getattr(os, "fdatasync", os.fsync)(fd)


def _lock(fd: int, path: str) -> None:
    """Hold the journal for this run; a run of another process is refused.

    A POSIX record lock (``lockf``), not ``flock``: workers forked while
    the run holds the file must not inherit the lock and keep it after the
    run. Closing any descriptor of the file drops it, so :func:`in_use`
    never opens a journal this process holds.
    """
    if path in _held:
        raise JournalError(
            path, "is in use", message=f"journal {path} is in use by a running call of this process"
        )
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks; one run per journal is the user's to keep
        _held.add(path)
        return
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        raise JournalError(
            path,
            "is in use",
            message=f"journal {path} is in use by a running call of another process",
        ) from None
    _held.add(path)


# -- listing and discarding -------------------------------------------------------


@dataclass(frozen=True)
class JournalInfo:
    """A journal on disk, as :func:`journals` lists it.

    Attributes
    ----------
    path : str
        Its file; pass it to :func:`discard_journal`.
    nbytes : int
        Its size.
    age : float
        Seconds since it was last written.
    recorded, total : int
        Items it records as done, of the run's items (-1: unreadable).
    label : str
        What ran: the function's name or the ``%%shm_parallel`` line.
    in_use : bool
        A running call is writing it.
    """

    path: str
    nbytes: int
    age: float
    recorded: int
    total: int
    label: str
    in_use: bool

    def describe(self) -> str:
        """One line: path, size, age, progress, what ran."""
        what = (
            f"{self.recorded} of {self.total} items" if self.total >= 0 else "damaged, discard it"
        )
        busy = ", in use" if self.in_use else ""
        return (
            f"{self.path}  {human_bytes(self.nbytes)}, {_age(self.age)} old, "
            f"{what}{busy}: {self.label}"
        )


def journals(directory: str | None = None) -> list[JournalInfo]:
    """Journals left by runs that did not finish, newest first.

    A journal stays when its run was stopped (the kernel died or was
    restarted, an item failed, an interrupt) until the same run is called
    again and finishes, or it is discarded, or it is older than
    :data:`~shm_kernel_safe.memory.janitor.JOURNAL_MAX_AGE_DAYS` days (then the janitor removes it).

    Parameters
    ----------
    directory : str, optional
        Where to look (default: the per-user cache folder's ``journals``).

    Returns
    -------
    list of JournalInfo

    Examples
    --------
    >>> import tempfile
    >>> import shm_kernel_safe as sks
    >>> sks.journals(tempfile.mkdtemp())
    []
    """
    _checks.path("directory", directory)
    directory = journal_directory() if directory is None else directory
    if not os.path.isdir(directory):
        return []
    now = time.time()
    found = []
    for entry in os.scandir(directory):
        if not entry.name.endswith(JOURNAL_SUFFIX):
            continue
        try:
            st = entry.stat()
        except OSError:
            continue
        found.append(_info(entry.path, st, now))
    return sorted(found, key=lambda j: j.age)


def _info(path: str, st: os.stat_result, now: float) -> JournalInfo:
    try:
        contents = read(path, payloads=False)
        header = contents.header
        recorded, total = contents.recorded, int(header["key"]["n_items"])
        label = str(header.get("label", "?"))
    except (JournalError, OSError, KeyError, pickle.UnpicklingError, EOFError):
        recorded, total, label = -1, -1, "?"
    return JournalInfo(
        path, st.st_size, max(0.0, now - st.st_mtime), recorded, total, label, in_use(path)
    )


def discard_journal(journal: str | os.PathLike | JournalInfo) -> None:
    """Remove a journal, so that its run starts from scratch next time.

    Parameters
    ----------
    journal : str, path or JournalInfo
        The journal's file (as :func:`journals` lists it, or as given to
        ``journal=``).

    Raises
    ------
    JournalError
        A running call is writing it.
    FileNotFoundError
        No such journal.
    """
    if isinstance(journal, JournalInfo):
        journal = journal.path
    path = os.fspath(_checks.path("journal", journal, optional=False))
    if in_use(path):
        raise JournalError(path, "is in use", message=f"journal {path} is in use by a running call")
    os.unlink(path)


@functools.lru_cache(maxsize=1)
def _janitor_ran() -> bool:
    with contextlib.suppress(OSError):
        remove_old_journals()
    return True
