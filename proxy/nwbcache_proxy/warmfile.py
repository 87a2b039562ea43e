"""Read what opening an NWB/HDF5 file needs, through the daemon: one file's metadata warm-up.

Run as ``python -m nwbcache_proxy.warmfile URL`` (a worker process: h5py
holds the GIL, so files are warmed in parallel processes, never on the
daemon's loop), or called in-process when no worker can be started. URL is
the file's proxied URL; every byte read goes through the daemon and stays in
its cache. Prints one JSON line: what was read, or the error.

What "metadata" means here, in the order it is read:

1. PyNWB's ``NWBHDF5IO(...).read()`` (with ``load_namespaces``): exactly
   the bytes a user's ``io.read()`` reads, in the same order, through the
   same client (remfile, as the DANDI tutorials use it), so its read-ahead
   chooses the same ranges;
2. h5py's visit of everything else: every group, every dataset's header
   (shape, type, layout, filters), every attribute's value, and every
   scalar dataset (a few bytes each). Datasets' values stay cold: that is
   data, for ``--full`` to fetch.

A file PyNWB cannot read (not NWB, an old schema) is still visited by h5py;
the PyNWB error is reported. A file that is not HDF5 fails.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from typing import Any

__all__ = ["warm"]


def warm(url: str) -> dict[str, Any]:
    """Read the file's metadata through ``url``; what was read (counts, timings)."""
    import h5py  # here: the daemon itself never imports h5py
    import remfile

    started = time.monotonic()
    detail: dict[str, Any] = {}
    handle = remfile.File(url)
    try:
        # Opened twice: closing PyNWB's reader closes the h5py file under it.
        # The second open reads nothing new (remfile keeps what it read).
        with h5py.File(handle, "r") as f:
            detail["pynwb"] = _pynwb_read(f)
        detail["pynwb_seconds"] = round(time.monotonic() - started, 3)
        with h5py.File(handle, "r") as f:
            detail.update(_visit(f))
    finally:
        handle.close()
    detail["seconds"] = round(time.monotonic() - started, 3)
    return detail


def _pynwb_read(f: Any) -> str:
    """``io.read()`` of the open file: "ok", or why PyNWB could not."""
    try:
        from pynwb import NWBHDF5IO

        with NWBHDF5IO(file=f, mode="r", load_namespaces=True) as io:
            io.read()
    except Exception as exc:  # any reader error: the h5py visit still runs
        return f"{type(exc).__name__}: {exc}"[:300]
    return "ok"


def _visit(f: Any) -> dict[str, int]:
    import h5py

    counts = {"groups": 1, "datasets": 0, "attributes": 0, "scalar_datasets": 0}

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
            obj.shape, obj.dtype, obj.chunks, obj.compression  # noqa: B018 - the header
            if obj.shape == ():
                obj[()]
                counts["scalar_datasets"] += 1
        attributes(obj)

    attributes(f)
    f.visititems(visit)
    return counts


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        sys.stderr.write("usage: python -m nwbcache_proxy.warmfile PROXIED_URL\n")
        return 2
    try:
        result: dict[str, Any] = {"ok": True, **warm(argv[0])}
    except Exception as exc:  # reported to the job, never a traceback in the daemon's log
        result = {"ok": False, "error": describe(exc)}
    print(json.dumps(result), flush=True)
    return 0 if result["ok"] else 1


def describe(exc: BaseException) -> str:
    """A warm-up error in a line a user can act on."""
    text = str(exc)
    if isinstance(exc, OSError) and "signature" in text.lower():
        return "not an HDF5 file (no HDF5 signature)"
    return f"{type(exc).__name__}: {text}"[:300]


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
