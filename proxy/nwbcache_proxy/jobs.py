"""Warm-up jobs on disk: one JSON file per job under ``v2/jobs/``, shared by every process.

A job's file is its whole state (what to warm, how far it got), rewritten
atomically (temp file, rename) as it progresses, so any process on the cache
dir can report it and a restarted daemon can resume it. The process running
a job holds an exclusive ``flock`` on ``<id>.lock`` while it lives: a job
whose lock is free and whose state is not final was left by a stopped
process, and whoever takes the lock first resumes it. Cancelling writes
``<id>.cancel``, which the runner looks for between files (the request may
reach another worker than the one running the job).
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import fcntl
import json
import os
import secrets
import time
from pathlib import Path
from typing import Any

from .layout import Layout

# The most files one job may list (a dandiset's assets; the job's file is
# rewritten as it goes).
MAX_FILES = 50_000
# Finished jobs kept for reports: the newest this many, none older than a week.
KEEP_FINISHED = 100
KEEP_SECONDS = 7 * 86400


class Mode(enum.StrEnum):
    METADATA = "metadata"  # what opening the file with h5py and PyNWB reads
    FULL = "full"  # every byte


class State(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"  # every file tried (some may have failed: see the files)
    CANCELLED = "cancelled"

    @property
    def final(self) -> bool:
        return self in (State.DONE, State.CANCELLED)


class FileState(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    SKIPPED = "skipped"  # not a file this warms (a Zarr asset): said why


@dataclasses.dataclass(slots=True)
class WarmFile:
    url: str  # the object's upstream URL (no signature)
    label: str  # what the user named it by (an asset path, or the URL)
    state: FileState = FileState.QUEUED
    error: str | None = None
    fetched_bytes: int = 0  # what the warm added to the cache
    seconds: float = 0.0
    detail: dict[str, Any] = dataclasses.field(default_factory=dict)  # what it read


@dataclasses.dataclass(slots=True)
class Job:
    id: str
    mode: Mode
    jobs: int  # files warmed at once
    files: list[WarmFile]
    created: float
    state: State = State.QUEUED
    started: float | None = None
    finished: float | None = None
    resumed: int = 0  # times a restarted daemon took it up again

    def summary(self) -> dict[str, Any]:
        """Counts by file state, bytes fetched, and the rate so far."""
        counts = {s.value: 0 for s in FileState}
        for f in self.files:
            counts[f.state.value] += 1
        fetched = sum(f.fetched_bytes for f in self.files)
        end = self.finished or time.time()
        elapsed = end - self.started if self.started else 0.0
        return {
            "files": len(self.files),
            **counts,
            "fetched_bytes": fetched,
            "elapsed_seconds": elapsed,
            "bytes_per_second": fetched / elapsed if elapsed > 0 else 0.0,
        }

    def to_json(self, *, files: bool = True) -> dict[str, Any]:
        # By hand, not dataclasses.asdict: a job of 10,000 files is saved
        # every SAVE_INTERVAL, and asdict's deep copy took half a second.
        value: dict[str, Any] = {
            "id": self.id, "mode": self.mode.value, "jobs": self.jobs,
            "created": self.created, "state": self.state.value, "started": self.started,
            "finished": self.finished, "resumed": self.resumed, "summary": self.summary(),
        }  # fmt: skip
        if files:
            value["files"] = [
                {"url": f.url, "label": f.label, "state": f.state.value, "error": f.error,
                 "fetched_bytes": f.fetched_bytes, "seconds": f.seconds, "detail": f.detail}
                for f in self.files
            ]  # fmt: skip
        return value

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> Job:
        files = [WarmFile(**{**f, "state": FileState(f["state"])}) for f in value.get("files", [])]
        fields = {k: v for k, v in value.items() if k not in ("files", "summary")}
        return cls(
            **{**fields, "mode": Mode(fields["mode"]), "state": State(fields["state"])},
            files=files,
        )


def new_id() -> str:
    """Sortable by creation, unguessable enough not to collide between processes."""
    return f"{int(time.time())}-{secrets.token_hex(3)}"


class JobStore:
    def __init__(self, layout: Layout) -> None:
        self.dir = layout.jobs

    def path(self, job_id: str) -> Path:
        if not job_id.replace("-", "").isalnum():
            raise KeyError(job_id)  # never a path outside the dir
        return self.dir / f"{job_id}.json"

    def save(self, job: Job) -> None:
        """Write the job's file whole, atomically."""
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.path(job.id)
        tmp = path.with_name(f".{job.id}.{os.getpid()}.tmp")
        # Readable by the daemon's user alone: job files name what a lab reads.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(json.dumps(job.to_json()))
        os.replace(tmp, path)

    def load(self, job_id: str) -> Job | None:
        try:
            return Job.from_json(json.loads(self.path(job_id).read_text()))
        except (FileNotFoundError, KeyError):
            return None
        except (OSError, ValueError, TypeError):
            return None  # half-written by a version of nwbcache that wrote otherwise

    def all(self) -> list[Job]:
        """Every job on record, oldest first."""
        if not self.dir.is_dir():
            return []
        found = [self.load(p.stem) for p in sorted(self.dir.glob("*.json"))]
        return [j for j in found if j is not None]

    def lock(self, job_id: str) -> int | None:
        """Take the job's lock (an fd to keep open while running it), or None
        when another live process holds it."""
        self.dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.dir / f"{job_id}.lock", os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        return fd

    def held(self, job_id: str) -> bool:
        """Whether a live process is running the job."""
        fd = self.lock(job_id)
        if fd is None:
            return True
        os.close(fd)
        return False

    def request_cancel(self, job_id: str) -> None:
        (self.dir / f"{job_id}.cancel").touch()

    def cancel_requested(self, job_id: str) -> bool:
        return (self.dir / f"{job_id}.cancel").exists()

    def prune(self, now: float | None = None) -> int:
        """Forget finished jobs beyond KEEP_FINISHED or older than KEEP_SECONDS."""
        now = time.time() if now is None else now
        finished = [j for j in self.all() if j.state.final]
        doomed = finished[:-KEEP_FINISHED] + [
            j for j in finished[-KEEP_FINISHED:] if (j.finished or j.created) < now - KEEP_SECONDS
        ]
        for job in doomed:
            for suffix in (".json", ".lock", ".cancel"):
                with contextlib.suppress(FileNotFoundError):
                    (self.dir / f"{job.id}{suffix}").unlink()
        return len(doomed)
