"""How items are cut into chunks: few messages, balanced finish.

Guided self-scheduling: each chunk takes a fixed share of what remains, so
the first chunks are big (few messages, little overhead) and the last ones
small (no worker idles while another finishes a huge chunk). A per-item
message, which is what ``Pool.map`` with chunksize=1 and ``Pool.imap`` do, is
what makes tiny tasks slower than serial.

A run first sends item 0 alone (the *probe*): its result tells the layout of
the results and its time the smallest chunk worth a message on this
transport (:func:`min_chunk_for`). Runs of a few items per worker skip the
probe and send every item on its own; a function run before skips it too,
its layout and item time remembered (:meth:`Plan.cut_all`, ``known_kinds``).
"""

from __future__ import annotations

from dataclasses import dataclass

#: A run of at most this many items per worker sends each item on its own.
FEW_ITEMS_PER_WORKER = 4


@dataclass(frozen=True)
class Chunk:
    """Items ``start`` to ``stop - 1`` of a run, sent as one message."""

    number: int
    start: int
    stop: int

    @property
    def size(self) -> int:
        return self.stop - self.start


def min_chunk_for(
    seconds_per_item: float | None, n_items: int, n_workers: int, min_chunk_seconds: float
) -> int:
    """Smallest chunk worth a message, from a measured item time.

    Small enough that the last chunks finish together (the tail is what a
    fixed split of halves has over us), large enough that the transport's
    cost per message (``min_chunk_seconds`` of work hides it) stays far
    below the work. Without a measurement, fall back to a count.
    """
    if seconds_per_item is None or seconds_per_item <= 0:
        return max(1, n_items // (64 * n_workers))
    return max(1, int(min_chunk_seconds / seconds_per_item))


def guided_chunks(
    n_items: int,
    n_workers: int,
    *,
    chunksize: int | None = None,
    first: int = 0,
    min_chunk: int | None = None,
) -> list[tuple[int, int]]:
    """``[start, stop)`` ranges covering ``first..n_items``.

    With ``chunksize`` the chunks are fixed-size (the user knows best); without,
    each is ``remaining / (2 * n_workers)`` items, never below ``min_chunk``
    (see :func:`min_chunk_for`).
    """
    if n_items < 0 or n_workers < 1:
        raise ValueError("n_items must be >= 0 and n_workers >= 1")
    if chunksize is not None:
        if chunksize < 1:
            raise ValueError(f"chunksize must be >= 1, got {chunksize}")
        return [(s, min(s + chunksize, n_items)) for s in range(first, n_items, chunksize)]
    remaining = n_items - first
    floor = max(1, min_chunk if min_chunk is not None else remaining // (64 * n_workers))
    chunks = []
    start = first
    while start < n_items:
        size = max(floor, (n_items - start) // (2 * n_workers))
        stop = min(n_items, start + size)
        chunks.append((start, stop))
        start = stop
    return chunks


class Plan:
    """The chunks of one run, cut in two steps around the probe."""

    def __init__(self, n_items: int, n_workers: int, chunksize: int | None) -> None:
        self.n_items = n_items
        self.n_workers = n_workers
        self.chunksize = chunksize
        self.probing = n_items > FEW_ITEMS_PER_WORKER * n_workers
        spans = [(0, 1)] if self.probing else [(i, i + 1) for i in range(n_items)]
        self.chunks = [Chunk(c, s, e) for c, (s, e) in enumerate(spans)]

    def max_chunks(self) -> int:
        """An upper bound on the number of chunks, known before the probe."""
        if not self.probing:
            return len(self.chunks)
        if self.chunksize is not None:
            return 1 + -(-self.n_items // self.chunksize)
        return 1 + len(guided_chunks(self.n_items, self.n_workers, first=1, min_chunk=1))

    def cut_rest(
        self, probe_seconds: float, min_chunk_seconds: float, max_chunk_seconds: float = 0.0
    ) -> list[Chunk]:
        """Chunks for items 1.. once the probe's time per item is known.

        ``max_chunk_seconds`` (when > 0 and the item time is known) caps a
        chunk's work: a journaled run learns of completed items per chunk,
        so that is the work a crash can cost per worker.
        """
        return self._cut(1, probe_seconds, min_chunk_seconds, max_chunk_seconds)

    def cut_all(
        self, item_seconds: float, min_chunk_seconds: float, max_chunk_seconds: float = 0.0
    ) -> list[Chunk]:
        """Chunks for every item, no probe: the item time is known from an
        earlier run of the same function (``known_kinds``)."""
        assert self.probing and len(self.chunks) == 1, "cut before anything was sent"
        self.chunks.clear()
        self.probing = False
        return self._cut(0, item_seconds, min_chunk_seconds, max_chunk_seconds)

    def _cut(
        self, first: int, item_seconds: float, min_chunk_seconds: float, max_chunk_seconds: float
    ) -> list[Chunk]:
        floor = min_chunk_for(item_seconds, self.n_items, self.n_workers, min_chunk_seconds)
        spans = guided_chunks(
            self.n_items, self.n_workers, chunksize=self.chunksize, first=first, min_chunk=floor
        )
        if max_chunk_seconds > 0 and item_seconds > 0 and self.chunksize is None:
            cap = max(floor, int(max_chunk_seconds / item_seconds))
            spans = [(s, min(e, s + cap)) for a, b in spans for s in range(a, b, cap) for e in (b,)]
        rest = [Chunk(len(self.chunks) + k, s, e) for k, (s, e) in enumerate(spans)]
        self.chunks.extend(rest)
        return rest

    def add(self, start: int, stop: int) -> Chunk:
        """A chunk for items ``start..stop-1`` run again (after a worker died)."""
        chunk = Chunk(len(self.chunks), start, stop)
        self.chunks.append(chunk)
        return chunk
