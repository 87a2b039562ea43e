"""Raw serving: wrk (Debian's package) asking random byte ranges of one object.

Measures requests/s, GB/s and latency percentiles with wrk's own numbers;
``--latency`` makes wrk print its percentile table.
"""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tests.support.helpers import find_tool

LUA = Path(__file__).resolve().parent / "ranges.lua"
_UNITS = {"B": 1, "KB": 1024, "MB": 1024**2, "GB": 1024**3, "TB": 1024**4}
_TIME_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1000.0, "m": 60_000.0}


@dataclass(frozen=True)
class WrkResult:
    requests: int
    seconds: float
    req_per_s: float
    gb_per_s: float  # decimal GB (1e9 bytes) of responses, headers included
    p50_ms: float
    p99_ms: float
    errors: int  # socket errors plus non-2xx answers: a run with any is not valid

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def wrk_binary() -> str:
    found = find_tool("wrk")
    if found is None:
        raise RuntimeError("wrk not found: run scripts/install-bench-deps.sh")
    return found


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if m is None:
        raise ValueError(f"not a wrk duration: {text!r}")
    return float(m[1]) * _TIME_UNITS[m[2]]


def parse_wrk(output: str) -> WrkResult:
    done = re.search(r"(\d+) requests in ([\d.]+)(ms|s|m), ([\d.]+)(B|KB|MB|GB|TB) read", output)
    if done is None:
        raise ValueError(f"unexpected wrk output:\n{output}")
    seconds = float(done[2]) * {"ms": 1e-3, "s": 1.0, "m": 60.0}[done[3]]
    nbytes = float(done[4]) * _UNITS[done[5]]
    pct = dict(re.findall(r"^\s+(50|99)(?:\.0+)?%\s+(\S+)$", output, re.MULTILINE))
    errors = 0
    sock = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output
    )
    if sock:
        errors += sum(int(x) for x in sock.groups())
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    if non2xx:
        errors += int(non2xx[1])
    requests = int(done[1])
    return WrkResult(
        requests=requests,
        seconds=seconds,
        req_per_s=requests / seconds,
        gb_per_s=nbytes / seconds / 1e9,
        p50_ms=_ms(pct["50"]) if "50" in pct else float("nan"),
        p99_ms=_ms(pct["99"]) if "99" in pct else float("nan"),
        errors=errors,
    )


def run_wrk(
    url: str,
    *,
    size: int,
    length: int,
    seconds: float,
    connections: int = 16,
    threads: int = 1,
) -> WrkResult:
    env = {**os.environ, "WRK_SIZE": str(size), "WRK_LEN": str(length)}
    cmd = [
        wrk_binary(),
        f"-t{threads}",
        f"-c{connections}",
        f"-d{max(1, round(seconds))}s",
        "--timeout",
        "30s",
        "--latency",
        "-s",
        str(LUA),
        url,
    ]
    out = subprocess.run(
        cmd, env=env, capture_output=True, text=True, check=True, timeout=seconds + 60
    )
    return parse_wrk(out.stdout)
