"""What a daemon process keeps in memory for bytes on their way; --buffer-memory shared. Pure.

Three uses, each bounded on its own:

- the pool (inflight.py): free buffers kept for the next block fetched or
  read from the page cache;
- blocks just written, kept for the reader read-ahead ran ahead of (recent.py);
- what the responses being streamed gather for their clients (batching.py).

``--buffer-memory`` is what all of a daemon's workers keep for them together:
each worker gets an equal share, split among the three as the defaults are
(3 : 1 : 1). Its default, ``auto``, gives each worker DEFAULT_SHARE (160 MiB)
but no more than AUTO_TOTAL (1 GiB) for all of them, and never less than
MIN_SHARE each: ``--workers auto`` on a 64-core server would otherwise keep
10 GiB for buffers once it had been busy (a pool keeps its buffers once
made).

This is memory kept between uses, not a cap on memory in use: a fill's
blocks in flight are bounded by ``--readahead`` per stream (fetcher.py), and
those whole but not yet written by WRITE_BEHIND_BYTES per process (fetch
runs pause beyond it: filling.WriteBacklog); a buffer needed when the pool
has none free is made anew and freed after. START_BYTES of the pool are
made once the daemon serves, the rest as a load needs it.
"""

from __future__ import annotations

import dataclasses

from .sizes import format_size

MIB = 1024 * 1024

# Free buffers the pool keeps, all size classes together: the blocks of
# several concurrent fetch runs, those kept a moment once written (RECENT),
# and reads from the page cache. At 32 MiB (fills alone) a 1 GiB cold fill
# ran at 0.92x the MB/s on 1.18x the CPU (new buffers zeroed and faulted in).
# Kept per size class, and in a second pool for reads, it was 64 MiB for each
# class of each pool: a cold fill's idle buffers stayed beside the reads' of
# the load after it, and reads that changed size (1 MiB, then a block at a
# time once many streams shared SEND) kept both sizes. 96 MiB, not 64, for
# fills and reads together: a cold fill beside 32 slow readers ran at 0.95x
# 50cb8cd's MB/s with 64 and 1.01x with 96 (medians of 5 paired ratios,
# noisy), and peak RSS with 256 streams stayed under 200 MB (191-198 cold).
POOL_BYTES = 96 * MIB
# Blocks kept once written. Read-ahead runs up to config.DEFAULT_READAHEAD
# (16 MiB) ahead of each sequential reader: this covers two such readers
# whole, more in part; a block not kept is read from disk as before.
RECENT_BYTES = 32 * MIB
# What the responses one process streams at once may gather between them. A
# batch the client has not taken yet stays in memory (in the transport's
# buffer, or a pooled buffer a view of which it holds): 256 streams of
# 1 MiB batches took the daemon's peak RSS to 212-274 MB with every block
# warm (bench.suite --only rss); with this budget (and one buffer pool),
# 136-170. Up to 32 streams, each gathers batching.BATCH_BYTES.
SEND_BYTES = 32 * MIB

DEFAULT_SHARE = POOL_BYTES + RECENT_BYTES + SEND_BYTES  # 160 MiB
# Of the pool, what a daemon makes once it serves (inflight.make_pool): the
# blocks four cold readers keep in flight (a 16 MiB range's runs, or
# read-ahead's 16 MiB window, each), so that its first fill makes none: a
# just-started daemon's first fill had run at 0.87x the MB/s of a later one,
# 16,000 page faults against ~700 with these made. The rest is made as a load
# needs it: made whole, the pool raised a light load's peak RSS by what it
# never used (one cold reader with 1 MiB blocks: 148 MB against 116). None
# for small blocks (inflight.MAKE_MIN).
START_BYTES = 64 * MIB
# Bytes of fetched blocks, whole and not yet written, beyond which fetch
# runs stop taking bytes from upstream until writes catch up.
# Nothing else waits for a write (readers stream from the blocks), so a fill
# faster than its disk grew the daemon by what it was ahead: one cold
# reader of 512 MiB in 1 MiB blocks, 77-165 MB of peak RSS from run to run
# with the event loop and the disk threads sharing two cores, and up to 274
# once one file was written from one thread at a time (aio.Disk lanes). A
# quarter of the pool: the blocks waiting come from it.
WRITE_BEHIND_BYTES = 24 * MIB
# ``auto`` keeps no more than this for all workers together (while each gets
# MIN_SHARE): up to 6 workers, the full default each, as measured; a host
# with more CPUs than that is a server the admin sizes (--buffer-memory), and
# until then a daemon does not take more than a small one's whole RAM share.
AUTO_TOTAL = 1024 * MIB
# Less per worker and a default block's fill makes most of its buffers anew
# (the pool would keep ~40 of 256 KiB).
MIN_SHARE = 16 * MIB


@dataclasses.dataclass(frozen=True, slots=True)
class Budget:
    """One process's bytes for each use."""

    pool: int
    recent: int
    send: int

    @classmethod
    def of(cls, share: int) -> Budget:
        """``share`` split as the defaults are: 3/5 pool, 1/5 each for the rest."""
        pool = share * POOL_BYTES // DEFAULT_SHARE
        recent = share * RECENT_BYTES // DEFAULT_SHARE
        return cls(pool, recent, share - pool - recent)

    @property
    def total(self) -> int:
        return self.pool + self.recent + self.send

    @property
    def start(self) -> int:
        """Of the pool, what is made at start (START_BYTES)."""
        return min(self.pool, START_BYTES)


# For --help and the docs: what ``auto`` does, from the figures above.
AUTO_TEXT = (
    f"{format_size(DEFAULT_SHARE)} per worker, at most {format_size(AUTO_TOTAL)} in all, "
    f"at least {format_size(MIN_SHARE)} each"
)


def share(total: int | None, workers: int) -> int:
    """Each of ``workers`` processes' share of ``total`` (None: ``auto``).
    Raises ValueError, saying what would do, when a share is under MIN_SHARE."""
    workers = max(1, workers)
    if total is None:
        return max(MIN_SHARE, min(DEFAULT_SHARE, AUTO_TOTAL // workers))
    if total < 0:
        raise ValueError(f"--buffer-memory must be a size or auto, got {total}")
    each = total // workers
    if each >= MIN_SHARE:
        return each
    if workers == 1:
        raise ValueError(
            f"--buffer-memory {format_size(total)} is too little: give at least "
            f"{format_size(MIN_SHARE)}"
        )
    raise ValueError(
        f"--buffer-memory {format_size(total)} gives each of {workers} workers "
        f"{format_size(max(0, each))}; give at least {format_size(MIN_SHARE)} per worker "
        f"({format_size(workers * MIN_SHARE)} in all), or fewer --workers"
    )
