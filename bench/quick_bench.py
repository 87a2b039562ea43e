"""A quick side-by-side measurement (a first cut of issue 5's suite).

Upstream: the S3 emulator with WAN-like first-byte latency and bandwidth cap.
File: a generated HDF5 file with a chunked 2-D dataset (an ElectricalSeries-
like shape, int16, 64 channels). Methods, each in one run, medians of N:

  local      h5py on the local file (the floor)
  remfile    remfile straight from the emulator (what users do today)
  cold       remfile through nwbcache, empty cache
  warm       remfile through nwbcache, cache filled by the cold run

Workloads: open (h5py.File + read attributes), slice (1 s x 64 channels at
30 kHz), scan (read the whole dataset). Also upstream bytes and requests per
method from the emulator's log, and warm raw serving of random 4 KiB and
1 MiB ranges (requests/s, MB/s) with a keep-alive aiohttp client.

    .venv/bin/python bench/quick_bench.py [--size-mb 256] [--latency 0.03] [--bandwidth 80e6]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp
import h5py
import numpy as np
import remfile

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from daemons import DaemonProcess
from s3emu import S3Emulator

RATE = 30_000
CHANNELS = 64
KEY = "/dandiarchive/blobs/ben/chm/ecephys.nwb"


def make_file(path: Path, size_mb: int) -> None:
    samples = size_mb * 1024 * 1024 // (CHANNELS * 2)
    rng = np.random.default_rng(0)
    with h5py.File(path, "w") as f:
        f.attrs["nwb_version"] = "2.7.0"
        grp = f.create_group("acquisition/ElectricalSeries")
        ds = grp.create_dataset(
            "data", shape=(samples, CHANNELS), dtype="int16", chunks=(RATE // 10, CHANNELS)
        )
        step = RATE * 10
        for start in range(0, samples, step):
            n = min(step, samples - start)
            ds[start : start + n] = rng.integers(-2000, 2000, size=(n, CHANNELS), dtype=np.int16)
        for i in range(200):  # metadata-heavy part: many small groups and attributes
            g = f.create_group(f"general/intracellular/sweep_{i:03d}")
            g.attrs["description"] = f"sweep {i}"
            g.create_dataset("stimulus", data=np.arange(100, dtype="f4"))


def open_and_walk(opener: Callable[[], object]) -> None:
    with h5py.File(opener(), "r") as f:
        f["acquisition/ElectricalSeries/data"].shape  # noqa: B018
        for name in f["general/intracellular"]:
            f[f"general/intracellular/{name}"].attrs["description"]


def slice_1s(opener: Callable[[], object]) -> None:
    with h5py.File(opener(), "r") as f:
        ds = f["acquisition/ElectricalSeries/data"]
        start = ds.shape[0] // 2
        ds[start : start + RATE, :]


def scan(opener: Callable[[], object]) -> None:
    with h5py.File(opener(), "r") as f:
        ds = f["acquisition/ElectricalSeries/data"]
        step = RATE * 10
        for start in range(0, ds.shape[0], step):
            ds[start : start + step, :]


def timed(fn: Callable[[], None]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


async def raw_serving(url: str, size: int, length: int, seconds: float = 3.0) -> dict[str, float]:
    rng = random.Random(1)
    done = 0
    nbytes = 0
    latencies: list[float] = []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=16)) as s:

        async def worker() -> None:
            nonlocal done, nbytes
            end = time.perf_counter() + seconds
            while time.perf_counter() < end:
                a = rng.randrange(0, size - length)
                t = time.perf_counter()
                async with s.get(url, headers={"Range": f"bytes={a}-{a + length - 1}"}) as r:
                    body = await r.read()
                latencies.append(time.perf_counter() - t)
                done += 1
                nbytes += len(body)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(16)))
        elapsed = time.perf_counter() - t0
    latencies.sort()
    return {
        "req_per_s": done / elapsed,
        "MB_per_s": nbytes / elapsed / 1e6,
        "p50_ms": latencies[len(latencies) // 2] * 1000,
        "p99_ms": latencies[int(len(latencies) * 0.99)] * 1000,
    }


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--size-mb", type=int, default=256)
    ap.add_argument("--latency", type=float, default=0.03)
    ap.add_argument("--bandwidth", type=float, default=80e6)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", type=Path, default=Path("bench/results-quick.json"))
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        path = tmp / "bench.nwb"
        make_file(path, args.size_mb)
        size = path.stat().st_size
        emu = S3Emulator(latency=args.latency, bandwidth=args.bandwidth)
        emu.start_in_thread()
        emu.put_file(KEY, path)
        origin_host = emu.url.removeprefix("http://")
        direct_url = emu.url_for(KEY)
        results: dict[str, dict[str, float]] = {}
        traffic: dict[str, dict[str, float]] = {}
        workloads = {"open": open_and_walk, "slice": slice_1s, "scan": scan}
        try:
            for wname, work in workloads.items():
                row: dict[str, list[float]] = {m: [] for m in ("local", "remfile", "cold", "warm")}
                for _ in range(args.repeat):
                    row["local"].append(timed(lambda w=work: w(lambda: path.open("rb"))))
                    emu.clear_log()
                    row["remfile"].append(timed(lambda w=work: w(lambda: remfile.File(direct_url))))
                    traffic.setdefault(
                        f"{wname}/remfile", {"bytes": emu.bytes_sent(), "requests": len(emu.log)}
                    )
                    daemon = DaemonProcess(
                        [
                            "--cache-dir",
                            str(tmp / f"cache-{wname}-{_}"),
                            "--allow-upstream",
                            origin_host,
                        ]
                    ).start()
                    try:
                        url = f"{daemon.url}/http/{origin_host}{KEY}"
                        emu.wait_idle()
                        emu.clear_log()
                        row["cold"].append(timed(lambda w=work, u=url: w(lambda: remfile.File(u))))
                        emu.wait_idle()
                        traffic.setdefault(
                            f"{wname}/nwbcache cold",
                            {"bytes": emu.bytes_sent(), "requests": len(emu.log)},
                        )
                        row["warm"].append(timed(lambda w=work, u=url: w(lambda: remfile.File(u))))
                        if wname == "scan" and _ == 0:
                            raw = {
                                f"{n // 1024} KiB": asyncio.run(raw_serving(url, size, n))
                                for n in (4096, 1024 * 1024)
                            }
                    finally:
                        daemon.terminate()
                results[wname] = {m: statistics.median(v) for m, v in row.items()}
        finally:
            emu.stop_thread()

    print(
        f"file {size / 1e6:.0f} MB; upstream latency {args.latency * 1000:.0f} ms, "
        f"{args.bandwidth / 1e6:.0f} MB/s per connection; median of {args.repeat}"
    )
    print(
        f"{'workload':8} {'local':>8} {'remfile':>9} {'cold':>8} {'warm':>8} "
        f"{'warm/local':>11} {'remfile/warm':>13}"
    )
    for w, r in results.items():
        print(
            f"{w:8} {r['local']:8.3f} {r['remfile']:9.3f} {r['cold']:8.3f} {r['warm']:8.3f} "
            f"{r['warm'] / r['local']:11.2f} {r['remfile'] / r['warm']:13.1f}"
        )
    print("upstream traffic (first run):")
    for k, v in traffic.items():
        print(f"  {k:22} {v['bytes'] / 1e6:9.2f} MB {v['requests']:6.0f} requests")
    print("warm raw serving, 16 concurrent keep-alive clients, random ranges:")
    for k, v in raw.items():
        print(
            f"  {k:>8}: {v['req_per_s']:8.0f} req/s {v['MB_per_s']:8.1f} MB/s "
            f"p50 {v['p50_ms']:.2f} ms p99 {v['p99_ms']:.2f} ms"
        )
    args.json.write_text(
        json.dumps(
            {
                "machine": platform.platform(),
                "python": platform.python_version(),
                "file_bytes": size,
                "latency": args.latency,
                "bandwidth": args.bandwidth,
                "seconds": results,
                "upstream": traffic,
                "raw_serving": raw,
            },
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
