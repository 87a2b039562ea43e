"""One measured client run, in a process of its own (so no client keeps a
warm in-memory cache between runs and no run shares a GIL with a server).

    python -m bench.clientrun '<json spec>'      # from the repository root

The spec names the method (how the file is opened), the workload, the URL or
path and the dataset to slice. Imports happen before the clock starts: the
time is what a script that already imported h5py and PyNWB waits for.
Prints one JSON line: seconds, and a digest of the bytes the workload read,
so the suite can check that every method returned the same data.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
import warnings
from collections.abc import Callable
from typing import IO, Any

import h5py
import numpy as np
import pynwb

Opener = Callable[[], Any]

# What the user's script would write for each way of reading. "url" is the
# object's URL as this method sees it (direct, through nginx, or proxied).
METHODS = (
    "local",
    "remfile",
    "fsspec",
    "fsspec-blockcache",
    "remfile-diskcache",
    "nginx-remfile",
    "nwbcache-remfile",
    "nwbcache-fsspec",
)
# opener() also knows "nwbcache-s3fs" and "nwbcache-ros3" (the daemon's S3
# endpoint), which bench/s3clients.py runs, the ros3 one in an interpreter
# whose h5py has ros3 (scripts/install-ros3-envs.sh); the suite does not.


def opener(spec: dict[str, Any]) -> Opener:
    """How the method opens the file. Its libraries are imported here, before the
    clock starts, and only its own: the ros3 runs use interpreters that have
    h5py and PyNWB but neither remfile nor fsspec (scripts/install-ros3-envs.sh)."""
    method, url = spec["method"], spec.get("url", "")
    if method == "nwbcache-ros3":  # url: a proxied URL (HDF5 1.x) or s3://bucket/key (2.x)
        return lambda: h5py.File(url, "r", driver="ros3")
    if method == "nwbcache-s3fs":  # url: bucket/key of the daemon's S3 endpoint
        import s3fs

        # With "endpoint", s3fs is pointed at it by hand (its defaults); without,
        # transparent mode (NWBCACHE_URL in the environment) routes it.
        fs3 = s3fs.S3FileSystem(anon=True, endpoint_url=spec.get("endpoint"))
        # What a process pays once, like its imports, goes before the clock
        # and is timed apart ("setup_seconds"): the botocore client (service
        # model, endpoint rules: ~0.25 s) and aiobotocore's first request
        # (~0.06 s of its own; a HeadBucket, which the daemon answers from its
        # settings). Each file's open and reads are on the clock.
        fs3.connect()
        fs3.call_s3("head_bucket", Bucket=url.partition("/")[0])
        return lambda: fs3.open(url, "rb")
    import fsspec
    import remfile

    if method == "local":
        return lambda: open(spec["path"], "rb")
    if method in ("remfile", "nginx-remfile", "nwbcache-remfile"):
        return lambda: remfile.File(url)
    if method == "remfile-diskcache":
        cache = remfile.DiskCache(spec["cache_dir"])
        return lambda: remfile.File(url, disk_cache=cache)
    if method in ("fsspec", "nwbcache-fsspec"):
        fs = fsspec.filesystem("http")
        return lambda: fs.open(url, "rb")
    if method == "fsspec-blockcache":
        fs = fsspec.filesystem(
            "blockcache", target_protocol="http", cache_storage=spec["cache_dir"]
        )
        return lambda: fs.open(url, "rb")
    raise SystemExit(f"unknown method {method!r}")


def _digest(array: np.ndarray[Any, Any]) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()[:16]


def _slice(ds: h5py.Dataset, rate: float) -> np.ndarray[Any, Any]:
    """1 s of data from the middle: 64 channels (ecephys), a 64 x 64 pixel
    window (imaging), one sweep's second (icephys)."""
    n = max(1, int(rate))
    start = max(0, ds.shape[0] // 2 - n // 2)
    if ds.ndim == 1:
        return np.asarray(ds[start : start + n])
    if ds.ndim == 2:
        return np.asarray(ds[start : start + n, 0:64])
    return np.asarray(ds[start : start + n, 0:64, 0:64])


def _scan(ds: h5py.Dataset) -> str:
    """Read the whole dataset front to back, a few chunks at a time."""
    step = (ds.chunks[0] if ds.chunks else 65536) * 4
    h = hashlib.sha256()
    for start in range(0, ds.shape[0], step):
        h.update(np.ascontiguousarray(ds[start : start + step]).tobytes())
    return h.hexdigest()[:16]


def run_workload(spec: dict[str, Any], open_file: Opener) -> str:
    workload = spec["workload"]
    opened = open_file()
    fobj: IO[bytes] | None = None if isinstance(opened, h5py.File) else opened
    try:
        with opened if fobj is None else h5py.File(fobj, "r") as f:
            if workload == "open":
                return ",".join(sorted(f.keys()))
            if workload == "scan":
                return _scan(f[spec["dataset"]])
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # namespace-cache chatter, not the point
                io = pynwb.NWBHDF5IO(file=f, mode="r", load_namespaces=True)
                nwb = io.read()
            if workload == "read":
                return nwb.identifier  # type: ignore[no-any-return]
            if workload == "read+slice":
                return _digest(_slice(f[spec["dataset"]], spec["rate"]))
            raise SystemExit(f"unknown workload {workload!r}")
    finally:
        if fobj is not None:
            fobj.close()


def main() -> int:
    spec = json.loads(sys.argv[1])
    setup_started = time.perf_counter()
    open_file = opener(spec)
    setup = time.perf_counter() - setup_started
    start_at = spec.get("start_at")  # concurrent runs start together, imports done
    if start_at is not None:
        time.sleep(max(0.0, start_at - time.time()))
    started = time.perf_counter()
    digest = run_workload(spec, open_file)
    seconds = time.perf_counter() - started
    print(
        json.dumps(
            {
                "seconds": seconds,
                "setup_seconds": setup,
                "digest": digest,
                "finished_at": time.time(),
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
