"""How many CPUs this process may use, for ``--workers auto``: affinity, capped by cgroup quota."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

# cgroup v2's mount, where each cgroup dir has ``cpu.max`` (``<quota|max> <period>``).
CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")
# cgroup v1's CPU controller, as a container sees it (its own cgroup at the root).
CGROUP_V1_QUOTA = CGROUP_ROOT / "cpu" / "cpu.cfs_quota_us"
CGROUP_V1_PERIOD = CGROUP_ROOT / "cpu" / "cpu.cfs_period_us"


def usable_cpus() -> int:
    """CPUs this process may use: its affinity mask (``--cpuset-cpus``, a
    unit's CPUAffinity), capped by the CPU quota of its cgroup and of every
    cgroup above it, rounded up (a container's ``--cpus 2.5``, a pod's CPU
    limit, a systemd unit's or slice's CPUQuota); not the machine's count, as
    nginx's ``auto`` would take."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    quotas = [
        cgroup_cpu_quota(_read_text(CGROUP_ROOT / d / "cpu.max"))
        for d in cgroup_v2_dirs(_read_text(PROC_CGROUP))
    ]
    quotas.append(cgroup_cpu_quota(f"{_read_text(CGROUP_V1_QUOTA)} {_read_text(CGROUP_V1_PERIOD)}"))
    limits = [q for q in quotas if q]
    return max(1, min(cpus, *limits)) if limits else cpus


def cgroup_v2_dirs(proc_cgroup: str) -> list[str]:
    """The cgroup v2 dirs of a process (relative to the mount), its own first,
    then each one above it, from its ``/proc/<pid>/cgroup`` (``0::/path``)."""
    for line in proc_cgroup.splitlines():
        if line.startswith("0::"):
            parts = [p for p in line[3:].strip().split("/") if p and p not in (".", "..")]
            return ["/".join(parts[:n]) for n in range(len(parts), -1, -1)]
    return []


def cgroup_cpu_quota(text: str) -> int | None:
    """CPUs a cgroup quota allows, rounded up: ``"250000 100000"`` is 3; None
    for no limit (``max``, v1's ``-1``) or nothing readable."""
    parts = text.split()
    if len(parts) != 2 or parts[0] in ("max", "-1"):
        return None
    try:
        quota, period = int(parts[0]), int(parts[1])
    except ValueError:
        return None
    if quota <= 0 or period <= 0:
        return None
    return -(-quota // period)


def _read_text(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def parse_workers(text: str, cpus: Callable[[], int] = usable_cpus) -> int:
    """``--workers``: a count, or ``auto`` for one per usable CPU."""
    if text.strip().lower() == "auto":
        return max(1, cpus())
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"--workers takes a number or auto, got {text!r}") from None
