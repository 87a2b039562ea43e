"""The report of ``nwbcache check``: what a run counted, as JSON and as text for a person. Pure."""

from __future__ import annotations

import dataclasses
from typing import Any

MAX_CORRUPT = 1000  # corrupt paths kept in the report (all are counted)
SHOWN_CORRUPT = 20  # of them, listed by the text summary


@dataclasses.dataclass(slots=True)
class CheckReport:
    objects: int = 0
    blocks: int = 0  # blocks the maps have
    bytes: int = 0
    verified: int = 0  # of them, read and verified (all unless sampling)
    verified_bytes: int = 0
    corrupt_count: int = 0
    corrupt: list[str] = dataclasses.field(default_factory=list)  # the first MAX_CORRUPT
    stale: int = 0  # blocks of another version or block size: valid, unreachable
    unmoved: int = 0  # format-1 and -2 block files not yet moved into data files
    busy: int = 0  # blocks being written or removed as the check came by: not read
    incomplete: int = 0  # versions with a map and no data file, or the other way round
    # Bytes on disk no map entry has (a crash between a group's bytes and its
    # entries): counted by a check, punched out by --repair (reclaimed).
    unmapped_bytes: int = 0
    reclaimed_bytes: int = 0
    missing_from_index: int = 0
    rows_wrong_size: int = 0  # index rows whose bytes are not their block's
    index_without_file: int = 0
    versions_without_dir: int = 0  # versions rows whose map is gone
    rows_dropped: int = 0  # their block rows, dropped by --repair
    scope: str = "all objects"
    index_phase: str = "all versions"
    sample: float = 1.0
    seed: int | None = None
    repaired: bool = False
    interrupted: bool = False
    resumed: bool = False

    @property
    def ok(self) -> bool:
        bad = self.missing_from_index + self.index_without_file + self.versions_without_dir
        bad += self.rows_wrong_size
        return not self.corrupt_count and not bad and not self.incomplete

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "ok": self.ok}

    def summary(self) -> str:
        sampled = f" (a {self.sample:g} sample, --seed {self.seed})" if self.sample < 1 else ""
        fixed = self.repaired and not self.interrupted
        lines = [
            f"{self.blocks} blocks, {self.bytes} bytes checked; objects: {self.objects} "
            f"({self.scope})",
            f"read and verified: {self.verified} blocks, {self.verified_bytes} bytes{sampled}",
            f"corrupt blocks: {self.corrupt_count}"
            + (" (removed)" if self.repaired and self.corrupt_count else ""),
            f"versions missing their data file or map: {self.incomplete}"
            + (" (removed)" if self.repaired and self.incomplete else ""),
            f"blocks being written or evicted as the check came by (not read): {self.busy}",
            f"blocks of other versions or block sizes (valid, evicted in time): {self.stale}",
            f"index rows missing: {self.missing_from_index}; index rows without a block: "
            f"{self.index_without_file}; index rows of the wrong size: {self.rows_wrong_size}"
            + (" (reconciled)" if fixed else ""),
            f"index versions without a map: {self.versions_without_dir}"
            + (f" (dropped with {self.rows_dropped} rows)" if fixed and self.rows_dropped else "")
            + f" [{self.index_phase}]",
            f"format-1 and -2 block files a daemon is yet to move: {self.unmoved}",
        ]
        if self.repaired and self.reclaimed_bytes:
            lines.append(f"bytes no map entry had, punched out: {self.reclaimed_bytes}")
        if self.unmapped_bytes:
            lines.append(
                f"bytes on disk no map entry has (--repair punches them out): {self.unmapped_bytes}"
            )
        lines += [f"  corrupt: {path}" for path in self.corrupt[:SHOWN_CORRUPT]]
        if self.corrupt_count > SHOWN_CORRUPT:
            lines.append(f"  ... and {self.corrupt_count - SHOWN_CORRUPT} more (see --json)")
        return "\n".join(lines)
