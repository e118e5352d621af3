"""How items are cut into chunks: few messages, balanced finish.

Guided self-scheduling: each chunk takes a fixed share of what remains, so
the first chunks are big (few messages, little overhead) and the last ones
small (no worker idles while another finishes a huge chunk). A per-item
message, which is what ``Pool.map`` with chunksize=1 and ``Pool.imap`` do, is
what makes tiny tasks slower than serial.
"""

from __future__ import annotations

#: Work per chunk below which the per-message cost (~0.1-0.3 ms) starts to show.
MIN_CHUNK_SECONDS = 0.004


def min_chunk_for(seconds_per_item: float | None, n_items: int, n_workers: int) -> int:
    """Smallest chunk worth a message, from a measured item time.

    Small enough that the last chunks finish together (the tail is what a
    fixed split of halves has over us), large enough that message costs
    stay far below the work. Without a measurement, fall back to a count.
    """
    if seconds_per_item is None or seconds_per_item <= 0:
        return max(1, n_items // (64 * n_workers))
    return max(1, int(MIN_CHUNK_SECONDS / seconds_per_item))


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
