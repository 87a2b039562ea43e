"""How many CPUs this process may use, for ``--workers auto``: affinity, capped by cgroup quota."""

from __future__ import annotations

import os
from pathlib import Path

# Where a container's CPU quota is: cgroup v2 (``<quota|max> <period>``), else v1.
CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")
CGROUP_V1_QUOTA = Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us")
CGROUP_V1_PERIOD = Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us")


def usable_cpus() -> int:
    """CPUs this process may use: its affinity mask (``--cpuset-cpus``, a
    unit's CPUAffinity), capped by its cgroup's CPU quota, rounded up (a
    container's ``--cpus 2.5``, a pod's CPU limit, a unit's CPUQuota); not
    the machine's count, as nginx's ``auto`` would take."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    quota = cgroup_cpu_quota(_read_text(CGROUP_CPU_MAX)) or cgroup_cpu_quota(
        f"{_read_text(CGROUP_V1_QUOTA)} {_read_text(CGROUP_V1_PERIOD)}"
    )
    return max(1, min(cpus, quota)) if quota else cpus


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
