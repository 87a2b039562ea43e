"""Record a block trace of a lab's day on the benchmark's PyNWB files, through a real daemon.

    python -m bench.policysim.record [--scale full] [--out bench/policysim/traces/lab-day.jsonl]

The S3 emulator serves the benchmark files (bench/nwbfiles.py); a daemon with
``--trace`` sits in front; fresh client processes (bench/clientrun.py, remfile
through the daemon, as a user's script) do what a lab's day does, in a seeded
order: PyNWB ``io.read()`` of every file by several users, slices of the
recording, one full scan of the imaging file and of the recording, then the
same users again. Replay it with ``python -m bench.policysim.simulate --trace``.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from bench.harness import Emulator
from bench.nwbfiles import BenchFile, ensure_files
from tests.support.daemons import DaemonProcess
from tests.support.helpers import REPO

READS_BEFORE = 4  # PyNWB io.read() per file before the scans
READS_AFTER = 3
SLICES_BEFORE, SLICES_AFTER = 3, 2


def day(files: dict[str, BenchFile], rng: random.Random) -> list[tuple[str, str]]:
    """(file kind, workload) in the order the lab's users run them."""
    before = [(k, "read") for k in files for _ in range(READS_BEFORE)]
    before += [("ecephys", "read+slice")] * SLICES_BEFORE
    after = [(k, "read") for k in files for _ in range(READS_AFTER)]
    after += [("ecephys", "read+slice")] * SLICES_AFTER
    rng.shuffle(before)
    rng.shuffle(after)
    return [*before, ("imaging", "scan"), ("ecephys", "scan"), *after]


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--scale", default="full", choices=["full", "quick", "smoke"])
    ap.add_argument("--data-dir", type=Path, default=REPO / ".bench-data")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "traces" / "lab-day.jsonl")
    ap.add_argument("--seed", type=int, default=5)
    args = ap.parse_args(argv)
    files = {f.kind: f for f in ensure_files(args.data_dir, args.scale)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(prefix="nwbcache-record-") as tmp:
        work = Path(tmp)
        emu = Emulator(args.data_dir, latency=0.0, bandwidth=10e9, log_path=work / "emu.log")
        emu.start()
        daemon = DaemonProcess(
            ["--cache-dir", str(work / "cache"), "--allow-upstream", emu.host],
            stderr_path=work / "daemon.log",
        )
        daemon.args += ["--trace", str(args.out)]
        daemon.start()
        try:
            for kind, workload in day(files, random.Random(args.seed)):
                f = files[kind]
                url = f"{daemon.url}/http/{emu.url_for(f.path.name).removeprefix('http://')}"
                spec: dict[str, object] = {"method": "nwbcache-remfile", "url": url}
                spec |= {"workload": workload}
                spec |= {"dataset": f.slice_dataset, "rate": f.rate}
                subprocess.run(
                    [sys.executable, "-m", "bench.clientrun", json.dumps(spec)],
                    cwd=REPO,
                    check=True,
                    capture_output=True,
                )
                print(f"  {kind:8} {workload}", file=sys.stderr)
            time.sleep(1.5)  # the daemon appends its trace once a second
        finally:
            daemon.terminate()
            emu.stop()
    print(f"wrote {args.out} ({len(args.out.read_text().splitlines())} blocks)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
