"""Code as users write it: writes into captured arrays have one outcome on
every transport, every argument is refused by name before any process
starts, and a run that cannot pay says why (PerformanceHint)."""

from __future__ import annotations

import time
import warnings

import numpy as np
import psutil
import pytest
from IPython.core.interactiveshell import InteractiveShell

import shm_kernel_safe as sks

from ..backends import backend, kw  # noqa: F401 - fixtures

pytestmark = pytest.mark.timeout(180)

X = np.random.default_rng(5).standard_normal((400, 8))
SIZES = {"small": 400, "big": 300_000}  # 3.2 KB pickled; 2.4 MB shared read-only


def expected(n: int) -> np.ndarray:
    return np.array([X[i % len(X)].sum() for i in range(n)])


# -- captured writes ---------------------------------------------------------------
def seed(n: int):
    """The seed's code: ``y = np.zeros(n)`` and a closure writing ``y[nn]``."""
    y = np.zeros(n)

    def hour(nn):
        y[nn] = X[nn % len(X)].sum()

    return y, hour


@pytest.mark.parametrize("size", SIZES)
def test_seed_pattern_fails_early_naming_out_on_every_transport(kw, size):
    n = SIZES[size]
    y, hour = seed(n)
    with pytest.raises(sks.InvalidArgumentError, match=r"writes into y.*out=\[y\].*--out y") as e:
        sks.parallel_map(hour, range(0, n, max(1, n // 200)), **kw)
    assert e.value.argument == "out"
    assert not y.any()  # nothing ran, on any transport


@pytest.mark.parametrize("size", SIZES)
def test_seed_pattern_with_out_lands_on_every_transport(kw, size):
    n = SIZES[size]
    y, hour = seed(n)
    sks.parallel_map(hour, range(n), out=y, **kw)  # a single array: out=[y]
    assert np.allclose(y, expected(n))


G = np.zeros(50)


def _write_global(nn):
    G[nn] += nn  # an augmented store, reached through a helper


def test_writes_in_helpers_and_nested_functions_are_found(kw):
    def via_helper(nn):
        _write_global(nn)

    def via_nested(nn):
        def inner():
            G[nn] = 1.0

        inner()

    for fn in (via_helper, via_nested):
        with pytest.raises(sks.InvalidArgumentError, match=r"out=\[G\]"):
            sks.parallel_map(fn, range(50), **kw)
    assert not G.any()


@pytest.mark.parametrize("size", SIZES)
def test_writes_the_check_cannot_see_fail_the_same_at_run_time(kw, size):
    n = SIZES[size]
    y = np.zeros(n)

    def hour(nn):
        np.copyto(y[nn : nn + 1], X[nn % len(X)].sum())  # no subscript store

    with pytest.raises(sks.TaskError, match=r"read-only.*out=\[y\]"):
        sks.parallel_map(hour, range(20), **kw)
    assert not y.any()
    assert y.flags.writeable  # the serial run gave the caller's array back writable


def test_a_writable_shared_array_is_written_in_place_where_memory_is_shared(kw):
    out = sks.zeros(100)

    def fill(nn):
        out[nn] = nn

    if kw["backend"] == "dask":  # a cluster's workers have copies: refused up front
        with pytest.raises(sks.InvalidArgumentError, match=r"out=\[out\]"):
            sks.parallel_map(fill, range(100), **kw)
        sks.parallel_map(fill, range(100), out=[out], **kw)
    else:
        sks.parallel_map(fill, range(100), **kw)
    assert np.array_equal(out, np.arange(100))


def test_reading_captured_arrays_and_writing_locals_is_not_refused(kw):
    def hour(nn):
        local = np.zeros(2)
        local[0] = X[nn].sum()
        return local[0]

    assert np.allclose(sks.parallel_map(hour, range(40), **kw), expected(40))


@pytest.fixture
def ip():
    shell = InteractiveShell.instance()
    shell.user_ns.clear()
    shell.init_user_ns()
    shell.run_line_magic("load_ext", "shm_kernel_safe")
    yield shell
    shell.run_line_magic("unload_ext", "shm_kernel_safe")
    shell.user_ns.clear()


@pytest.mark.parametrize("size", SIZES)
def test_the_magic_treats_a_written_array_as_out(ip, kw, capsys, size):
    n = SIZES[size]
    ip.user_ns.update(X=X, y=np.zeros(n), np=np)
    options = f"--backend {kw['backend']}"
    if "start_method" in kw:
        options += f" --start-method {kw['start_method']} -n {kw['processes']}"
    res = ip.run_cell(
        f"%%shm_parallel nn in range({n}) {options} --progress none\ny[nn] = X[nn % len(X)].sum()\n"
    )
    assert res.success, res.error_in_exec
    assert np.allclose(ip.user_ns["y"], expected(n))
    printed = capsys.readouterr().out
    assert printed.count("treated as --out y") == 1, printed


# -- runaway processes ---------------------------------------------------------------
@pytest.mark.filterwarnings("ignore:processes=1000 is more than:UserWarning")
def test_a_thousand_processes_for_five_items_start_five_at_most(kw):
    """Never more workers than items, on every transport (the warning of
    processes above the CPU count: test_edges)."""
    got = sks.parallel_map(abs, range(5), **{**kw, "processes": 1000})
    assert got.tolist() == list(range(5))
    if kw["backend"] == "local":
        from shm_kernel_safe.transports.local import pool

        (info,) = pool.pool_info()
        assert len(info["pids"]) <= 5
    elif kw["backend"] == "dask":
        from shm_kernel_safe.transports.dask import cluster

        assert len(cluster.get_client(None).nthreads()) <= 5
        sks.parallel_map(abs, range(2), **{**kw, "processes": 2})  # the module's size again


def test_more_processes_than_cpus_warn_once_at_the_callers_line(kw, monkeypatch):
    """Our own dask cluster's workers are processes of this machine too."""
    if kw["backend"] == "serial":
        pytest.skip("the serial backend starts no process")
    from shm_kernel_safe import _platform
    from shm_kernel_safe.engine import transport

    monkeypatch.setattr(transport, "_warned_processes", set())
    n = _platform.usable_cpus() + 1
    with pytest.warns(UserWarning, match=f"processes={n} is more than") as record:
        got = sks.parallel_map(abs, range(2), **{**kw, "processes": n})
    assert got.tolist() == [0, 1]
    assert {w.filename for w in record if "is more than" in str(w.message)} == {__file__}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per value
        sks.parallel_map(abs, range(2), **{**kw, "processes": n})
    if kw["backend"] == "dask":
        sks.parallel_map(abs, range(2), **{**kw, "processes": 2})  # the module's size again


# -- arguments ----------------------------------------------------------------------
WRONG = {
    "items": [5, np.array(5), "abc"],
    "processes": [0, -1, 2.5, "2", True],
    "start_method": ["thread", 3],
    "chunksize": [0, 1.5, "5"],
    "timeout": [0, -1, "1", True],
    "share_threshold": ["big", -1, 1.5],
    "share": [5, [1, 2], [[1, 2]], "x"],
    "out": [[[1, 2]], 5, [np.array(["a"], dtype=object)]],
    "progress": [True, "bar", 5, lambda: None, lambda done: None],
    "backend": ["loky", "ray", 3],
    "client": ["tcp://127.0.0.1:1"],
    "errors": ["ignore", 1],
    "retries": [-1, 1.5, "2"],
    "item_timeout": [0, "1"],
    "threads_per_worker": [0, 1.5],
    "journal": [5, [1]],
    "keep_journal": ["yes", 2],
    "wait": ["no", 0],
    "n_jobs": [2],
    "verbose": [10],
}


def _children() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True)}


@pytest.mark.usefixtures("no_orphans")
@pytest.mark.parametrize("name", WRONG)
def test_every_wrong_argument_is_named_before_any_process_starts(name):
    sks.shutdown_pools()
    before = _children()
    for value in WRONG[name]:
        args = {"items": range(3)}
        if name == "items":
            args["items"] = value
        else:
            args[name] = value
        items = args.pop("items")
        with pytest.raises(sks.InvalidArgumentError) as e:
            sks.parallel_map(abs, items, **args)
        assert e.value.argument == name, (name, value, e.value)
        assert name in str(e.value)
        assert _children() <= before, (name, value)


def test_numpy_integers_and_a_single_out_array_are_accepted():
    y = np.zeros(3)
    got = sks.parallel_map(
        float, range(3), processes=np.int64(1), chunksize=np.int64(5), out=y, backend="serial"
    )
    assert got.tolist() == [0.0, 1.0, 2.0]


def test_peer_names_say_what_to_use():
    with pytest.raises(TypeError, match=r"no n_jobs= argument; did you mean processes="):
        sks.parallel_map(abs, range(3), n_jobs=2)
    with pytest.raises(ValueError, match=r"did you mean backend='local'"):
        sks.parallel_map(abs, range(3), backend="loky")
    with pytest.raises(TypeError, match=r"did you mean progress='text'"):
        sks.parallel_map(abs, range(3), verbose=1)
    with pytest.raises(TypeError, match=r"no chunk= argument; did you mean chunksize="):
        sks.parallel_map(abs, range(3), chunk=10)


@pytest.mark.usefixtures("no_orphans")
def test_other_public_functions_refuse_wrong_arguments_by_name():
    sks.shutdown_pools()
    before = _children()
    for kwargs, name in [
        ({"processes": 0}, "processes"),
        ({"processes": "2"}, "processes"),
        ({"start_method": "thread"}, "start_method"),
        ({"threads_per_worker": 0}, "threads_per_worker"),
    ]:
        with pytest.raises(sks.InvalidArgumentError) as e:
            sks.prestart(**kwargs)
        assert e.value.argument == name
    for value in (-1, 1.5, "1"):
        with pytest.raises(sks.InvalidArgumentError, match="max_bytes"):
            sks.share_cache_limit(value)
    for name, call in [
        ("n_jobs", lambda: sks.prestart(n_jobs=2)),
        ("ordered", lambda: sks.imap(abs, range(3), ordered="yes")),
        ("shape", lambda: sks.zeros(-1)),
        ("shape", lambda: sks.empty(2.5)),
        ("shape", lambda: sks.zeros("a")),
        ("shape", lambda: sks.empty((2, None))),
        ("dtype", lambda: sks.zeros(3, dtype="bogus")),
        ("dtype", lambda: sks.empty(3, dtype=object)),
        ("order", lambda: sks.zeros(3, order="X")),
        ("a", lambda: sks.share(np.array([None, 1]))),
        ("directory", lambda: sks.find_stale(5)),
        ("directory", lambda: sks.cleanup_stale(5)),
        ("directory", lambda: sks.journals(5)),
        ("journal", lambda: sks.discard_journal(5)),
        ("join_timeout", lambda: sks.shutdown_pools(join_timeout=-1)),
        ("join_timeout", lambda: sks.shutdown_pools("x")),
    ]:
        with pytest.raises(sks.InvalidArgumentError) as e:
            call()
        assert e.value.argument == name and name in str(e.value), (name, e.value)
    assert _children() <= before


def test_prestart_says_which_name_a_peers_keyword_is():
    with pytest.raises(TypeError, match=r"no n_jobs= argument; did you mean processes="):
        sks.prestart(n_jobs=2)


def test_the_magics_options_are_refused_before_any_process_starts(ip, capsys):
    sks.shutdown_pools()
    before = _children()
    cases = {
        "nn in range(3) --progress bar": "--progress",
        "nn in range(3) -n 0": "-n/--processes",
        "nn in range(3) --threads 0": "--threads",
        "nn in range(3) --retries -1": "--retries",
        "nn in range(3) --item-timeout 0": "--item-timeout",
        "nn in range(3) --out nothere": "--out nothere",
        "nn in range(3) --share nothere": "--share nothere",
        "nn in 5": "'5'",
    }
    for line, option in cases.items():
        res = ip.run_cell(f"%%shm_parallel {line}\npass\n")
        assert not res.success
        err = capsys.readouterr()
        assert option in err.out + err.err, (line, err.out + err.err)
    assert _children() <= before


# -- PerformanceHint ------------------------------------------------------------------
BIG = np.ones((1_000_000, 8))  # 64 MB: copied into shared memory by a first call


@pytest.mark.usefixtures("no_orphans")
def test_tiny_items_on_a_cold_pool_get_one_hint():
    # A cold spawn pool (each worker imports numpy) plus a first copy of
    # 64 MB cost far more than 200 items of a microsecond, however busy the
    # machine: the comparison cannot go the other way by luck.
    sks.shutdown_pools()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sks.parallel_map(lambda i: BIG.shape[0] + i, range(200), processes=2, start_method="spawn")
    hints = [w for w in caught if issubclass(w.category, sks.PerformanceHint)]
    assert len(hints) == 1, [str(w.message) for w in caught]
    text = str(hints[0].message)
    assert "\n" not in text and "prestart" in text and "%shm_share" in text
    assert hints[0].filename == __file__  # points at the user's call


def test_tiny_items_after_a_first_copy_get_one_hint_on_every_transport(kw):
    # A fresh 128 MB input (no copy of it kept from an earlier call): its
    # first trip to the workers costs tens of milliseconds at least, 200
    # items of microseconds a few. In-process (serial) there is no such
    # cost, and nothing to say.
    fresh = np.ones((2_000_000, 8))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sks.parallel_map(lambda i: fresh.shape[0] + i, range(200), **kw)
    hints = [str(w.message) for w in caught if issubclass(w.category, sks.PerformanceHint)]
    assert len(hints) == (kw["backend"] != "serial"), hints


def test_items_that_outweigh_the_fixed_costs_say_nothing(kw):
    sks.parallel_map(abs, range(2), **kw)  # the pool or cluster warm and idle
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # 12 items: enough to be planned from a probe (the hint's only path)
        sks.parallel_map(lambda s: time.sleep(s), [0.15] * 12, **kw)
    hints = [str(w.message) for w in caught if issubclass(w.category, sks.PerformanceHint)]
    assert not hints


def test_the_hint_compares_the_run_with_its_fixed_costs():
    from shm_kernel_safe.engine.hints import hint_text

    assert hint_text(8760, 30e-6, 1.4) is not None  # the README's first call
    assert hint_text(8760, 30e-6, 0.01) is None  # warm: nothing to say
    assert hint_text(4, 0.3, 1.0) is None  # big items pay for the start
    assert "~300 ms" in hint_text(10_000, 30e-6, 2.0)  # type: ignore[operator]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(sks.PerformanceHint):
            warnings.warn("x", sks.PerformanceHint, stacklevel=1)
    assert issubclass(sks.PerformanceHint, UserWarning)


def test_troubleshooting_starts_with_the_hint_as_users_see_it():
    """The docs' first section is "parallel is not faster", quotes the
    message the library prints for the README's first call (8760 items of
    ~8 us, 1.4 s of fixed costs), and gives the causes in order."""
    import pathlib
    import re

    from shm_kernel_safe.engine.hints import hint_text

    page = (pathlib.Path(__file__).parents[2] / "docs" / "troubleshooting.md").read_text()
    sections = re.findall(r"^## (.+)$", page, re.M)
    assert sections[0] == "Parallel is not faster", sections
    quoted = re.search(r"```text\nPerformanceHint: (.*?)```", page, re.S)
    assert quoted is not None
    assert " ".join(quoted.group(1).split()) == hint_text(8760, 8e-6, 1.4)
    causes = re.findall(r"^\d\. \*\*(.+?)\*\*", page, re.M)[:3]
    assert causes == ["Tiny items.", "The first call.", "Load."], causes


@pytest.mark.usefixtures("no_orphans")
def test_the_magics_hint_points_at_the_cell(ip):
    sks.shutdown_pools()
    ip.user_ns.update(BIG=BIG)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = ip.run_cell(
            "%%shm_parallel nn in range(200) -n 2 --start-method spawn --progress none\n"
            "BIG.shape[0] + nn\n"
        )
    assert res.success, res.error_in_exec
    hints = [w for w in caught if issubclass(w.category, sks.PerformanceHint)]
    assert len(hints) == 1 and hints[0].filename.startswith("<shm_parallel cell ")


@pytest.mark.timeout(240)
def test_seed_pattern_in_a_real_kernel():
    """The seed's cells in ipykernel: the magic without --out fills y and says
    so once; parallel_map without out= is refused naming the fix; a cold
    run of tiny items shows one PerformanceHint line on stderr."""
    from ..helpers import shm_entries
    from ..kernels import evaluate, execute, kernel

    before = shm_entries()
    with kernel("ipykernel") as (_km, client):
        execute(client, "%load_ext shm_kernel_safe")
        execute(
            client,
            "import numpy as np, shm_kernel_safe as sks\n"
            "x = np.random.default_rng(0).standard_normal((876_000, 2))  # 14 MB: shared\n"
            "y = np.zeros(8760)\n",
        )
        res = execute(
            client,
            "%%shm_parallel nn in range(8760) -n 2 --start-method spawn --progress none\n"
            "y[nn] = x[nn::8760].sum()\n",
        )
        assert res["status"] == "ok", res
        assert res["stdout"].count("treated as --out y") == 1, res["stdout"]
        assert res["stderr"].count("PerformanceHint") <= 1, res["stderr"]
        check = "bool(np.allclose(y, [x[n::8760].sum() for n in range(8760)]))"
        assert evaluate(client, check) == "True"
        res = execute(
            client,
            "y[:] = 0\n"
            "def hour(nn):\n    y[nn] = x[nn::8760].sum()\n"
            "sks.parallel_map(hour, range(8760), processes=2, start_method='spawn')\n",
        )
        assert res["status"] == "error" and res["error"]["ename"] == "InvalidArgumentError"
        assert "out=[y]" in res["error"]["evalue"], res["error"]["evalue"]
        assert evaluate(client, "int(np.count_nonzero(y))") == "0"
        execute(client, "sks.shutdown_pools()")
    assert shm_entries() == before
