"""``nwbcache check``: verify the cached blocks and the index, streaming and resumable.

A sorted walk over ``objects/<p>/<kh>/<version>/<shard>/``, one listing at a time:
meta.json, every block read and verified (header, length, CRC; the current
version's digest, index, length), each shard dir compared with the index
(reconcile.py); other versions' blocks are ``stale``, format 1's flat ones
``unmoved``; then rows of version dirs that are gone. After each object a cursor
is saved, so an interrupted check resumes. Safe while daemons run: only blocks
failing verification are deleted, the index is repaired in transactions.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import secrets
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from tqdm import tqdm  # type: ignore[import-untyped]

from nwbcache.urls import InvalidURL, key_of

from . import blockfile, reconcile, schema, store
from .blockfile import HEADER_SIZE, CorruptBlock
from .layout import Layout, key_hash
from .objectmeta import ObjectMeta, block_span
from .reconcile import scan_dir

MAX_CORRUPT = 1000  # corrupt paths kept in the report (all are counted)
SHOWN_CORRUPT = 20  # of them, listed by the text summary
VERSION_BATCH = 256  # versions rows per step of the last phase
CURSOR_FORMAT = 1
_VERSIONS_PHASE = "~"  # the last phase's position sorts after every object's


class CheckError(Exception):
    """A check that cannot run as asked: bad options, nothing to resume (exit status 2)."""


@dataclasses.dataclass(frozen=True, slots=True)
class CheckOptions:
    """What shapes a run: a resumed run must be given the same."""

    repair: bool = False
    sample: float = 1.0  # the fraction of blocks read and verified
    seed: int | None = None  # of the sample; None: a random one (reported)
    prefix: str | None = None  # only objects whose cache key starts with this
    key: str | None = None  # only the object of this cache key


@dataclasses.dataclass(slots=True)
class CheckReport:
    objects: int = 0
    blocks: int = 0  # block files listed
    bytes: int = 0
    verified: int = 0  # of them, read and verified (all unless sampling)
    verified_bytes: int = 0
    corrupt_count: int = 0
    corrupt: list[str] = dataclasses.field(default_factory=list)  # the first MAX_CORRUPT
    stale: int = 0  # blocks of another version or block size: valid, unreachable
    unmoved: int = 0  # format-1 blocks not yet in shard dirs
    missing_from_index: int = 0
    index_without_file: int = 0
    versions_without_dir: int = 0  # versions rows whose directory is gone
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
        return not self.corrupt_count and not bad

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
            + (" (deleted)" if self.repaired and self.corrupt_count else ""),
            f"blocks of other versions or block sizes (valid, evicted in time): {self.stale}",
            f"index rows missing: {self.missing_from_index}; index rows without a file: "
            f"{self.index_without_file}" + (" (reconciled)" if fixed else ""),
            f"index versions without a directory: {self.versions_without_dir}"
            + (f" (dropped with {self.rows_dropped} rows)" if fixed and self.rows_dropped else "")
            + f" [{self.index_phase}]",
            f"format-1 blocks a daemon is yet to move (index not compared): {self.unmoved}",
        ]
        lines += [f"  corrupt: {path}" for path in self.corrupt[:SHOWN_CORRUPT]]
        if self.corrupt_count > SHOWN_CORRUPT:
            lines.append(f"  ... and {self.corrupt_count - SHOWN_CORRUPT} more (see --json)")
        return "\n".join(lines)


def url_key(url: str, *, prefix: bool = False) -> str:
    """The cache key of an object's URL (``--object``), or of a URL prefix (``--prefix``):
    scheme and host lowercased, default port dropped, s3:// as https://, signature
    parameters removed. A prefix ending with the host means the whole host."""
    try:
        return key_of(url, prefix=prefix)
    except InvalidURL as exc:
        raise CheckError(f"{'--prefix' if prefix else '--object'}: {exc}") from None


def check_cache(
    cache_dir: Path, options: CheckOptions | None = None, *, resume: bool = False,
    progress: bool = False, on_object: Callable[[str, CheckReport], None] | None = None,
) -> CheckReport:  # fmt: skip
    """Check (with ``options.repair``, repair) the cache. ``resume``: go on from the
    cursor (CheckError if none, or its options differ). ``on_object(<p>/<kh>,
    report)`` runs after each object's cursor is saved. KeyboardInterrupt
    returns the report as of the cursor, ``interrupted``."""
    layout = Layout(cache_dir)
    options = options or CheckOptions()
    if not 0 < options.sample <= 1:
        raise CheckError(f"--sample must be a fraction in (0, 1], not {options.sample:g}")
    if options.prefix is not None and options.key is not None:
        raise CheckError("give --prefix or --object, not both")
    if not layout.root.is_dir() and layout.legacy_root.is_dir():
        raise CheckError(f"{layout.legacy_root} is format 1: a daemon converts it at start")
    if resume:
        options, position, report = _load_cursor(layout, options)
    else:
        seed = options.seed if options.sample < 1 else None
        seed = secrets.randbelow(2**31) if seed is None and options.sample < 1 else seed
        options, position = dataclasses.replace(options, seed=seed), []
        report = CheckReport(sample=options.sample, seed=seed, repaired=options.repair)
        if options.key is not None:
            report.scope, report.index_phase = f"the object {options.key}", "its versions"
        elif options.prefix is not None:
            report.scope = f"cache keys starting with {options.prefix}"
            report.index_phase = "versions of objects whose meta.json has the prefix"
    if not layout.root.is_dir():
        return report  # no cache yet: nothing to check
    exists = layout.index_path.exists() or options.repair
    conn = schema.connect(layout.index_path) if exists else None
    try:
        whole = options.prefix is None and options.key is None
        total = schema.totals(conn)[1] if conn is not None and whole else None
        with tqdm(
            total=total, initial=report.blocks, unit="blk", unit_scale=True,
            disable=not progress, desc="nwbcache check", dynamic_ncols=True,
        ) as bar:  # fmt: skip
            run = _Run(layout, options, conn, report, bar, on_object)
            try:
                run.walk(position)
            except KeyboardInterrupt:
                return CheckReport(**{**run.saved, "interrupted": True})
    finally:
        if conn is not None:
            conn.close()
    store.unlink_quietly(layout.check_cursor)
    return report


def _load_cursor(layout: Layout, opts: CheckOptions) -> tuple[CheckOptions, list[str], CheckReport]:
    path = layout.check_cursor
    try:
        data = json.loads(path.read_text())
        if data.get("format") != CURSOR_FORMAT:
            raise ValueError(f"format {data.get('format')!r}")
        saved = CheckOptions(**data["options"])
        position = [part for part in str(data["position"]).split("/") if part]
        report = CheckReport(**{**data["report"], "resumed": True})
    except FileNotFoundError:
        raise CheckError(f"no interrupted check to resume ({path} does not exist)") from None
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CheckError(f"unreadable cursor {path} ({exc}): run without --resume") from None
    if opts.seed is None:
        opts = dataclasses.replace(opts, seed=saved.seed)
    if opts != saved:
        raise CheckError(
            f"the interrupted check ran with other options ({saved}, not {opts}): resume "
            "with the same options, or start over without --resume"
        )
    return saved, position, report


class _Run:
    """One walk, from a position (``[]``, ``[p, kh]`` or ``["~", version id]``)."""

    def __init__(
        self, layout: Layout, options: CheckOptions, conn: sqlite3.Connection | None,
        report: CheckReport, bar: Any, on_object: Callable[[str, CheckReport], None] | None,
    ) -> None:  # fmt: skip
        self.layout, self.opts, self.conn, self.report = layout, options, conn, report
        self.bar, self.on_object = bar, on_object
        self.threshold = int(options.sample * 2**64)
        self.saved: dict[str, Any] = dataclasses.asdict(report)
        self.started, self.read_bytes = time.monotonic(), 0  # for the rate shown
        self.begin = "BEGIN IMMEDIATE" if options.repair else "BEGIN"
        kh = key_hash(options.key) if options.key is not None else None
        self.only = None if kh is None else self.layout.relative(self.layout.object_dir(kh))

    def walk(self, position: list[str]) -> None:
        self.save(position)
        for p, kh in self._objects(position):
            self.report.objects += self._object(p, kh)
            self.save([p, kh])
            if self.on_object is not None:
                self.on_object(f"{p}/{kh}", self.report)
        if self.conn is None:
            self.report.index_phase = "skipped: there is no index"
        else:
            self._versions_phase(self.conn, position)

    def save(self, position: list[str]) -> None:
        """The cursor: where the walk is, its options and the counts so far."""
        snapshot = dataclasses.asdict(self.report)
        data = {"format": CURSOR_FORMAT, "options": dataclasses.asdict(self.opts)}
        data.update(position="/".join(position), report=snapshot)
        tmp = self.layout.check_cursor.with_name(f"check.cursor.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data))
        os.replace(tmp, self.layout.check_cursor)
        self.saved = snapshot  # once on disk: an interrupt returns what a resume starts from

    def _objects(self, position: list[str]) -> Iterator[tuple[str, str]]:
        """(p, kh) of the objects after ``position``, in order."""
        if self.only is not None:
            p, kh = self.only.split("/")[1:3]
            yield from [(p, kh)] if not position or [p, kh] > position else []
            return
        for p in _subdirs(self.layout.objects):
            if not position or p >= position[0]:
                yield from (
                    (p, kh) for kh in _subdirs(self.layout.objects / p) if [p, kh] > position
                )

    def _object(self, p: str, kh: str) -> bool:
        """Check one object dir; False if it is not there or not selected."""
        path = self.layout.objects / p / kh
        raw = store.read_meta(path / "meta.json") or {}
        key = raw["cache_key"] if isinstance(raw.get("cache_key"), str) else None
        if self.opts.prefix is not None and not (key or "\0").startswith(self.opts.prefix):
            return False  # a missing or unreadable meta.json: not known to match
        meta = ObjectMeta.from_json(raw, key) if key is not None else None
        if meta is not None and key_hash(meta.cache_key) != kh:
            meta = None  # misplaced: trusted for no block here
        for name in (versions := _subdirs(path)):
            bs = Layout.block_size_of(name)
            if bs is not None:
                mine = meta and path / name == self.layout.version_dir(kh, meta.digest, bs)
                self._version(path / name, meta if mine else None, bs)
        return bool(versions or raw)

    def _version(self, vdir: Path, meta: ObjectMeta | None, block_size: int) -> None:
        name, listed_at = self.layout.relative(vdir), time.time()
        shards: list[tuple[int, str]] = []
        flat = 0
        for entry in scan_dir(vdir):
            if entry.is_dir(follow_symlinks=False):
                shard = Layout.shard_of_dir(entry.name)
                shards += [(shard, entry.name)] if shard is not None else []
            elif Layout.block_index_of(entry.name) is not None:
                flat += 1
        self.report.unmoved += flat
        shards.sort()
        for shard, dirname in shards:
            self._shard(name, shard, vdir / dirname, meta, block_size, compare=not flat)
        if flat or self.conn is None:  # rows of flat blocks would seem orphans
            return
        # Rows of blocks in shards without a dir, which sync_shard never sees.
        with self.conn:
            self.conn.execute(self.begin)
            self.report.index_without_file += reconcile.sync_outside(
                self.conn, name, [s for s, _ in shards], listed_at, write=self.opts.repair
            )

    def _shard(
        self, name: str, shard: int, path: Path, meta: ObjectMeta | None, block_size: int,
        *, compare: bool,
    ) -> None:  # fmt: skip
        report, listed_at = self.report, time.time()
        found = reconcile.list_shard(path, shard)
        for index in sorted(found):
            size, file = found[index][0], f"{index}.blk"  # a str: pathlib interns names
            report.blocks, report.bytes = report.blocks + 1, report.bytes + size
            self.bar.update(1)
            problem = None
            if self._sampled(name, index):
                report.verified += 1
                report.verified_bytes += size
                self.read_bytes += size
                try:
                    problem = _verify(path, file, index, meta, block_size)
                except FileNotFoundError:
                    del found[index]  # evicted while we looked
                    continue
            report.stale += problem is None and meta is None
            if problem is not None:
                report.corrupt_count += 1
                if len(report.corrupt) < MAX_CORRUPT:
                    report.corrupt.append(f"{self.layout.relative(path / file)}: {problem}")
                if self.opts.repair:
                    store.unlink_quietly(path / file)
                    del found[index]
        rate = self.read_bytes / max(time.monotonic() - self.started, 1e-6)
        self.bar.set_postfix_str(f"{tqdm.format_sizeof(rate)}B/s read", refresh=False)
        if not compare or self.conn is None:
            report.missing_from_index += len(found) if compare else 0
            return
        with self.conn:
            self.conn.execute(self.begin)
            missing, gone = reconcile.sync_shard(
                self.conn, name, shard, found, listed_at, write=self.opts.repair
            )
        report.missing_from_index += missing
        report.index_without_file += gone

    def _sampled(self, name: str, index: int) -> bool:
        """Whether this block is read: the same answer for a seed, however the run goes."""
        if self.opts.sample >= 1:
            return True
        h = hashlib.blake2b(f"{self.opts.seed}/{name}/{index}".encode(), digest_size=8)
        return int.from_bytes(h.digest(), "big") < self.threshold

    def _versions_phase(self, conn: sqlite3.Connection, position: list[str]) -> None:
        """Rows of versions whose directory is gone (a crash mid-drop, or a lost dir)."""
        after = int(position[1]) if position[:1] == [_VERSIONS_PHASE] else 0
        while batch := conn.execute(schema.VERSION_NAMES, (after, VERSION_BATCH)).fetchall():
            after = int(batch[-1][0])
            gone = [int(vid) for vid, name in batch if self._gone(str(name))]
            self.report.versions_without_dir += len(gone)
            if gone and self.opts.repair:
                with conn:
                    conn.execute("BEGIN IMMEDIATE")
                    for vid in gone:
                        cur = conn.execute(schema.DELETE_VERSION_ID, (vid,))
                        self.report.rows_dropped += max(cur.rowcount, 0)
            self.save([_VERSIONS_PHASE, str(after)])

    def _gone(self, version: str) -> bool:
        """Whether a version in the run's scope has no directory."""
        if self.layout.version_path(version).is_dir():
            return False
        if self.only is not None or self.opts.prefix is None:
            return self.only is None or version.startswith(self.only + "/")
        raw = store.read_meta(self.layout.meta_path_of_version(version)) or {}
        return str(raw.get("cache_key")).startswith(self.opts.prefix)


def _verify(path: Path, file: str, index: int, meta: ObjectMeta | None, bs: int) -> str | None:
    """None if the block is sound; else what is wrong with it. Without ``meta`` (a
    block of another version), against its own header and its version dir's name."""
    with open(os.path.join(path, file), "rb") as fh:
        raw = fh.read()
    try:
        header = blockfile.decode_header(raw)
        data = raw[HEADER_SIZE:]
        if len(data) != header.length:
            raise CorruptBlock(f"{len(data)} data bytes, header says {header.length}")
        blockfile.check_data(header, data)  # "checksum mismatch"
        if meta is not None:
            start, end = block_span(index, meta.version.size, bs)
            n, digest = end - start, meta.digest
        else:  # as long as it claims, of the version its dir is named after
            n, vd = min(header.length, bs), path.parent.name.split(".")[0]
            digest = header.version_digest if header.version_digest.hex()[:32] == vd else b""
        blockfile.check_header(header, index=index, length=n, digest=digest, file_size=len(raw))
    except CorruptBlock as exc:
        return str(exc)
    return None


def _subdirs(path: Path) -> list[str]:
    return sorted(e.name for e in scan_dir(path) if e.is_dir(follow_symlinks=False))
