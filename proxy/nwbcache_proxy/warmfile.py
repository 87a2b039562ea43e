"""Read what opening an NWB/HDF5 file needs, through the daemon: one file's metadata warm-up.

Run as ``python -m nwbcache_proxy.warmfile --serve`` (a worker process:
h5py holds the GIL, so files are warmed in parallel processes, never on the
daemon's loop; warmworkers.py keeps a pool of them): it reads a proxied URL
per line on stdin and answers each with one JSON line on stdout, what was
read or the error, so h5py is imported once per worker, not once per file.
``python -m nwbcache_proxy.warmfile URL`` does one file. Called in-process
(``warm``) when no worker can be started. Every byte read goes through the
daemon (remfile, as the DANDI tutorials read) and stays in its cache.

What "metadata" means: h5py's visit of the whole file, reading every
group, every dataset's header (shape, type, layout, filters) and every
attribute's value, and of the datasets' values what hdmf's reader (under
PyNWB's ``io.read()``) reads, with a margin: a scalar's value; a string,
reference or compound array's first element (hdmf looks at it to choose a
type); and the whole of any dataset of at most SMALL_DATASET bytes (PyNWB
turns some short arrays into values: file_create_date, keywords,
experimenter...). The rest of the values stay cold: that is data, for
``--full``. PyNWB itself is not run: building its objects costs seconds of
CPU on a file with many objects (3 s for the benchmark's icephys file
against 0.6 s for this visit) and reads nothing more (``make bench-warm``
counts the origin's requests of an ``io.read()`` afterwards: none).

A file that is not HDF5 fails with that reason.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from typing import Any

# Datasets of at most this many bytes are read whole.
SMALL_DATASET = 64 * 1024

__all__ = ["warm"]


def warm(url: str) -> dict[str, Any]:
    """Read the file's metadata through ``url``; what was read (counts, timings)."""
    import h5py  # here: the daemon itself never imports h5py
    import remfile

    started = time.monotonic()
    detail: dict[str, Any] = {}
    handle = remfile.File(url)
    try:
        with h5py.File(handle, "r") as f:
            detail.update(_visit(f))
    finally:
        handle.close()
    detail["seconds"] = round(time.monotonic() - started, 3)
    return detail


def _visit(f: Any) -> dict[str, int]:
    import h5py

    counts = {"groups": 1, "datasets": 0, "attributes": 0, "scalar_datasets": 0,
              "small_datasets": 0, "first_elements": 0}  # fmt: skip

    def attributes(obj: Any) -> None:
        for name in obj.attrs:
            # A type h5py cannot turn into a value has still been read.
            with contextlib.suppress(OSError, TypeError, ValueError):
                obj.attrs[name]
            counts["attributes"] += 1

    def visit(_name: str, obj: Any) -> None:
        if isinstance(obj, h5py.Group):
            counts["groups"] += 1
        elif isinstance(obj, h5py.Dataset):
            counts["datasets"] += 1
            _dataset(obj, counts)
        attributes(obj)

    attributes(f)
    f.visititems(visit)
    return counts


def _dataset(ds: Any, counts: dict[str, int]) -> None:
    """What hdmf's reader (under PyNWB's io.read()) reads of a dataset, and a
    little more: the header; a scalar's value; a string or reference array's
    first element (hdmf looks at it to choose a type); and the whole of any
    dataset of at most SMALL_DATASET bytes (PyNWB turns some short arrays
    into values: file_create_date, keywords, experimenter...)."""
    ds.shape, ds.dtype, ds.chunks, ds.compression  # noqa: B018 - the header
    with contextlib.suppress(OSError, TypeError, ValueError):
        if ds.shape == ():
            ds[()]
            counts["scalar_datasets"] += 1
        elif ds.size == 0 or ds.shape is None:
            return
        elif (
            ds.id.get_storage_size() <= SMALL_DATASET
            and ds.size * ds.dtype.itemsize <= SMALL_DATASET
        ):
            ds[()]
            counts["small_datasets"] += 1
        elif ds.dtype.kind in "OV":
            ds[(0,) * ds.ndim]
            counts["first_elements"] += 1


def main(argv: list[str]) -> int:
    if argv == ["--serve"]:
        import h5py  # noqa: F401 - imported before the first URL, not during it
        import remfile  # noqa: F401

        for line in sys.stdin:
            if line.strip():
                print(json.dumps(answer(line.strip())), flush=True)
        return 0
    if len(argv) != 1:
        sys.stderr.write("usage: python -m nwbcache_proxy.warmfile (PROXIED_URL | --serve)\n")
        return 2
    result = answer(argv[0])
    print(json.dumps(result), flush=True)
    return 0 if result["ok"] else 1


def answer(url: str) -> dict[str, Any]:
    try:
        return {"ok": True, **warm(url)}
    except Exception as exc:  # reported to the job, never a traceback in the daemon's log
        return {"ok": False, "error": describe(exc)}


def describe(exc: BaseException) -> str:
    """A warm-up error in a line a user can act on."""
    text = str(exc)
    if isinstance(exc, OSError) and "signature" in text.lower():
        return "not an HDF5 file (no HDF5 signature)"
    return f"{type(exc).__name__}: {text}"[:300]


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
