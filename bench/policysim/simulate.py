"""Replay traces against every policy at several cache sizes; print, save and plot the figures.

    .venv/bin/python -m bench.policysim.simulate                 # the synthetic mixes
    .venv/bin/python -m bench.policysim.simulate --trace t.jsonl # and a recorded trace
    .venv/bin/python -m bench.policysim.simulate --help

Cache sizes are fractions of a trace's *working set*: the bytes of the blocks it
reads more than once (blocks read once are misses for every policy, the optimum
included). Also runs issue 12's scan test at 64 MiB and reports how many of the 24
files' heads each policy still holds after the scan.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from collections.abc import Hashable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.policysim.base import CacheSpec, Policy
from bench.policysim.policies import POLICIES, make
from bench.policysim.traces import (
    DEFAULT_BLOCK_SIZE,
    MIXES,
    MiB,
    Trace,
    dump_jsonl,
    lab_mix,
    load_jsonl,
    scan_scenario,
)

DEFAULT_FRACTIONS = (0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
DEFAULT_OUT = Path(__file__).resolve().parent / "results"
SCAN_CACHE = 64 * MiB  # issue 12: --cache-size 64M


@dataclass(frozen=True)
class Result:
    """One policy at one cache size on one trace."""

    trace: str
    policy: str
    fraction: float
    capacity: int
    accesses: int
    misses: int
    miss_bytes: int
    total_bytes: int
    meta_accesses: int = 0
    meta_misses: int = 0

    @property
    def miss_ratio(self) -> float:
        return self.misses / self.accesses if self.accesses else 0.0

    @property
    def byte_miss_ratio(self) -> float:
        return self.miss_bytes / self.total_bytes if self.total_bytes else 0.0

    @property
    def meta_miss_ratio(self) -> float:
        return self.meta_misses / self.meta_accesses if self.meta_accesses else 0.0


def intern(trace: Trace) -> tuple[list[int], list[int]]:
    """The trace's keys as small ints (repeatable hashing) and its sizes."""
    ids: dict[tuple[str, int], int] = {}
    keys = [ids.setdefault(a.key, len(ids)) for a in trace.accesses]
    return keys, [a.bytes for a in trace.accesses]


def replay(
    policy: Policy,
    keys: Sequence[Hashable],
    sizes: Sequence[int],
    metadata: Sequence[bool] | None = None,
) -> tuple[int, int, int]:
    """Feed every access to ``policy``; return (misses, missed bytes, metadata misses)."""
    misses = miss_bytes = meta_misses = 0
    access = policy.access
    flags = metadata if metadata is not None else [False] * len(keys)
    for key, size, meta in zip(keys, sizes, flags, strict=True):
        if not access(key, size):
            misses += 1
            miss_bytes += size
            meta_misses += meta
    return misses, miss_bytes, meta_misses


def run_trace(
    trace: Trace, policies: Sequence[str], fractions: Sequence[float], log: bool = True
) -> list[Result]:
    keys, sizes = intern(trace)
    metadata = [a.is_metadata for a in trace.accesses]
    meta_keys = frozenset(k for k, m in zip(keys, metadata, strict=True) if m)
    first = frozenset(k for k, a in zip(keys, trace.accesses, strict=True) if a.block == 0)
    working_set = trace.reused_footprint() or trace.footprint()
    total = sum(sizes)
    out = []
    for fraction in fractions:
        capacity = max(trace.block_size, int(working_set * fraction))
        spec = CacheSpec(capacity, trace.block_size, keys, meta_keys, first)
        for name in policies:
            started = time.perf_counter()
            misses, miss_bytes, meta = replay(make(name, spec), keys, sizes, metadata)
            out.append(
                Result(
                    trace.name,
                    name,
                    fraction,
                    capacity,
                    len(keys),
                    misses,
                    miss_bytes,
                    total,
                    sum(metadata),
                    meta,
                )
            )
            if log:
                took = time.perf_counter() - started
                print(
                    f"  {trace.name} {fraction:>5.0%} {name:<11} {misses / len(keys):7.2%} "
                    f"({took / len(keys) * 1e6:.2f} µs per access)",
                    file=sys.stderr,
                )
    return out


def scan_test(
    policies: Sequence[str], capacity: int = SCAN_CACHE, trace: Trace | None = None
) -> dict[str, dict[str, int]]:
    """Issue 12's scan test per policy: of the files whose heads are read again after the
    scan, how many still have all their head blocks resident right after the scan, and
    how many have a block fetched again by the re-read."""
    trace = trace or scan_scenario()
    keys, sizes = intern(trace)
    mark = trace.marks["after_scan"]
    meta_keys = frozenset(k for k, a in zip(keys, trace.accesses, strict=True) if a.is_metadata)
    first = frozenset(k for k, a in zip(keys, trace.accesses, strict=True) if a.block == 0)
    files: dict[str, set[int]] = {}
    for key, a in zip(keys[mark:], trace.accesses[mark:], strict=True):
        files.setdefault(a.object, set()).add(key)
    out = {}
    for name in policies:
        policy = make(name, CacheSpec(capacity, trace.block_size, keys, meta_keys, first))
        replay(policy, keys[:mark], sizes[:mark])
        resident = sum(all(k in policy for k in heads) for heads in files.values())
        missed = set()
        for key, size in zip(keys[mark:], sizes[mark:], strict=True):
            if not policy.access(key, size):
                missed.add(key)
        refetched = sum(bool(heads & missed) for heads in files.values())
        out[name] = {"files": len(files), "resident_after_scan": resident, "refetched": refetched}
    return out


def _pct(x: float) -> str:
    return f"{x:.1%}"


def meta_cell(r: Result) -> str:
    return _pct(r.meta_miss_ratio)


def tables(results: Sequence[Result], trace: Trace) -> str:
    """Markdown: miss ratio, byte miss ratio, and misses against LRU and the optimum."""
    fractions = sorted({r.fraction for r in results})
    policies = list(dict.fromkeys(r.policy for r in results))
    at = {(r.policy, r.fraction): r for r in results}
    caps = [at[(policies[0], f)].capacity for f in fractions]
    head = "| policy | " + " | ".join(
        f"{f:.0%} ({c / MiB:,.0f} MiB)" for f, c in zip(fractions, caps, strict=True)
    )
    rule = "|---" * (len(fractions) + 1) + "|"
    lines = [
        f"**{trace.name}** — {trace.description}. {len(trace):,} accesses, footprint "
        f"{trace.footprint() / MiB:,.0f} MiB, working set (blocks read more than once) "
        f"{trace.reused_footprint() / MiB:,.0f} MiB.",
        "",
    ]

    def table(title: str, cell: Any) -> None:
        lines.extend([f"{title}:", "", head + " |", rule])
        for p in policies:
            cells = " | ".join(cell(at[(p, f)]) for f in fractions)
            lines.append(f"| {p} | {cells} |")
        lines.append("")

    table("Miss ratio", lambda r: _pct(r.miss_ratio))
    table("Byte miss ratio", lambda r: _pct(r.byte_miss_ratio))
    if results[0].meta_accesses:
        share = results[0].meta_accesses / results[0].accesses
        table(f"Miss ratio of metadata reads ({share:.0%} of accesses)", meta_cell)
    if "lru" in policies and "belady" in policies:

        def versus(r: Result) -> str:
            lru, opt = at[("lru", r.fraction)].misses, at[("belady", r.fraction)].misses
            change = (r.misses - lru) / lru if lru else 0.0
            gap = (r.misses - opt) / opt if opt else 0.0
            return f"{change:+.0%} / +{gap:.0%}"

        table("Misses against LRU / above Belady's optimum", versus)
        distinct = len({a.key for a in trace.accesses})

        def avoidable(r: Result) -> str:
            lru = at[("lru", r.fraction)].misses - distinct
            return f"{(r.misses - distinct - lru) / lru:+.0%}" if lru else "-"

        share = distinct / len(trace)
        lines.append(f"First accesses (misses for any policy): {share:.1%} of all.")
        lines.append("")
        table("Avoidable misses (misses − first accesses) against LRU", avoidable)
    return "\n".join(lines)


def scan_table(scans: dict[str, dict[str, dict[str, int]]]) -> str:
    """One row per policy, one column per variant: files whose heads were fetched again."""
    variants = list(scans)
    lines = [
        "| policy | " + " | ".join(f"{v}: re-fetched" for v in variants) + " |",
        "|---" * (1 + len(variants)) + "|",
    ]
    for name in scans[variants[0]]:
        cells = []
        for v in variants:
            n, again = scans[v][name]["files"], scans[v][name]["refetched"]
            cells.append(f"{again}/{n} ({again / n:.0%})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results: Sequence[Result], traces: Sequence[Trace], path: Path) -> bool:
    """A PNG of miss ratio against cache size per policy, one panel per trace, if
    matplotlib is installed; return whether it was written."""
    try:
        matplotlib: Any = importlib.import_module("matplotlib")
    except ImportError:
        return False
    matplotlib.use("Agg")
    plt: Any = importlib.import_module("matplotlib.pyplot")
    fig, axes = plt.subplots(1, len(traces), figsize=(5 * len(traces), 4), squeeze=False)
    for ax, trace in zip(axes[0], traces, strict=True):
        mine = [r for r in results if r.trace == trace.name]
        for name in dict.fromkeys(r.policy for r in mine):
            rows = sorted((r for r in mine if r.policy == name), key=lambda r: r.capacity)
            style = "k--" if name == "belady" else "-o"
            ax.plot(
                [r.capacity / MiB for r in rows], [r.miss_ratio for r in rows], style, label=name
            )
        ax.set_xscale("log")
        ax.set_xlabel("cache size (MiB)")
        ax.set_ylabel("miss ratio")
        ax.set_title(trace.name)
        ax.grid(True, alpha=0.3)
    axes[0][0].legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.policysim.simulate", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--mix", action="append", choices=sorted(MIXES), help="synthetic mix (all)")
    p.add_argument("--trace", action="append", type=Path, default=[], help="JSON-lines trace")
    p.add_argument("--no-mixes", action="store_true", help="replay only the --trace files")
    p.add_argument("--seed", type=int, default=12)
    p.add_argument("--block-size", type=int, default=DEFAULT_BLOCK_SIZE)
    p.add_argument(
        "--sizes",
        default=",".join(str(f) for f in DEFAULT_FRACTIONS),
        help="cache sizes as fractions of each trace's working set, comma-separated",
    )
    p.add_argument("--policies", default=",".join(POLICIES), help="comma-separated")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results.json, results.md, PNG")
    p.add_argument("--save-traces", type=Path, help="also write each trace here as JSON lines")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    unknown = [p for p in policies if p not in POLICIES]
    if unknown:
        print(f"unknown policies: {', '.join(unknown)}; known: {', '.join(POLICIES)}")
        return 2
    fractions = [float(f) for f in args.sizes.split(",")]
    traces = [load_jsonl(path, args.block_size) for path in args.trace]
    if not args.no_mixes:
        for name in args.mix or list(MIXES):
            traces.append(lab_mix(MIXES[name], args.seed, args.block_size, name))
    args.out.mkdir(parents=True, exist_ok=True)
    if args.save_traces:
        args.save_traces.mkdir(parents=True, exist_ok=True)
        for trace in [*traces, scan_scenario()]:
            dump_jsonl(trace, args.save_traces / f"{trace.name}.jsonl")
    report: list[str] = []
    results: list[Result] = []
    for trace in traces:
        mine = run_trace(trace, policies, fractions, log=not args.quiet)
        results.extend(mine)
        report.append(tables(mine, trace))
    scans = {}
    report.append(f"**Scan test** (issue 12), {SCAN_CACHE // MiB} MiB cache:")
    report.append("")
    # At the block size, 256 KiB, whatever --block-size: the test, the same
    # with the cache already full, and with each head read once only before the scan.
    for prefill, rounds in ((0, 3), (SCAN_CACHE, 3), (0, 1)):
        trace = scan_scenario(prefill=prefill, rounds=rounds)
        scans[trace.name] = scan_test(policies, trace=trace)
        report.append(f"- {trace.name}: {trace.description}")
    report.extend(["", scan_table(scans), ""])
    text = "\n".join(report)
    print(text)
    (args.out / "results.md").write_text(text + "\n")
    payload = {
        "settings": {"seed": args.seed, "block_size": args.block_size, "fractions": fractions},
        "traces": [
            {
                "name": t.name,
                "description": t.description,
                "accesses": len(t),
                "footprint_bytes": t.footprint(),
                "working_set_bytes": t.reused_footprint(),
            }
            for t in traces
        ],
        "results": [
            {**asdict(r), "miss_ratio": r.miss_ratio, "byte_miss_ratio": r.byte_miss_ratio}
            for r in results
        ],
        "scan_test": scans,
    }
    (args.out / "results.json").write_text(json.dumps(payload, indent=1) + "\n")
    png = args.out / "miss-ratio.png"
    if plot(results, traces, png):
        print(f"\nwrote {png}")
    else:
        print("\nmatplotlib is not installed: no plot (the figures are in results.json).")
    print(f"wrote {args.out / 'results.json'} and {args.out / 'results.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
