"""The policy simulator (bench.policysim): each policy on tiny traces whose hits are worked
out by hand, properties every policy must keep (hits are exactly the resident keys, the
byte capacity holds, Belady's MIN is never beaten), traces, and the simulator's report.

Traces in the tables are space-separated keys of one block each (size 1); a cache of
capacity N holds N of them. The expected pattern has ``H`` for a hit, ``-`` for a miss.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bench.policysim import simulate
from bench.policysim.base import CacheSpec, Policy
from bench.policysim.policies import (
    ARC,
    FIFO,
    LRU,
    POLICIES,
    S3FIFO,
    SLRU,
    Belady,
    Clock,
    TwoQ,
    WTinyLFU,
    make,
)
from bench.policysim.tinylfu import FrequencySketch
from bench.policysim.traces import (
    Access,
    LabMix,
    Trace,
    blocks_of_range,
    dump_jsonl,
    lab_mix,
    load_jsonl,
    scan_scenario,
)


def hits(policy: Policy, trace: str) -> str:
    return "".join("H" if policy.access(key, 1) else "-" for key in trace.split())


Factory = Callable[[int, list[str]], Policy]

CASES: list[tuple[str, Factory, int, str, str]] = [
    # (id, policy, capacity, trace, expected)
    ("lru keeps the recently hit a", lambda c, _: LRU(c), 2, "a b a c a", "--H-H"),
    ("fifo evicts a though it was hit", lambda c, _: FIFO(c), 2, "a b a c a", "--H--"),
    ("lru evicts b, least recent", lambda c, _: LRU(c), 2, "a b b a c b", "--HH--"),
    ("clock: both referenced, one lap, a goes", lambda c, _: Clock(c), 2, "a b b a c b", "--HH-H"),
    ("lru: a scan flushes a", lambda c, _: LRU(c), 4, "a a b c d e f a", "-H------"),
    ("slru: a hit protects a from a scan", lambda c, _: SLRU(c), 4, "a a b c d e f a", "-H-----H"),
    # Kin = 1, Kout = 2: a and b pass A1in into A1out; a's miss there puts it in Am,
    # which A1in's churn (x y z) does not touch.
    ("2q: A1out feeds Am", lambda c, _: TwoQ(c), 4, "a b c d e a e a x y z a", "------HH---H"),
    ("2q: a hit in A1in is not a reuse", lambda c, _: TwoQ(c), 4, "a a b c d e a", "-H-----"),
    # a and b are in T2; the scan goes through T1 (p = 0) and leaves them.
    ("arc: T2 survives a scan", lambda c, _: ARC(c), 4, "a a b b c d e f g a b", "-H-H-----HH"),
    ("lru: the same scan", lambda c, _: LRU(c), 4, "a a b b c d e f g a b", "-H-H-------"),
    # c's next use is never: it is not cached, a and b stay.
    ("belady bypasses c", lambda c, t: Belady(c, t), 2, "a b c a b", "---HH"),
    # c is needed before b: b (furthest) goes.
    ("belady evicts the furthest", lambda c, t: Belady(c, t), 2, "a b c c a b", "---HH-"),
    ("lru on the same", lambda c, _: LRU(c), 2, "a b c c a b", "---H--"),
]


@pytest.mark.parametrize(
    ("factory", "capacity", "trace", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_hits_by_hand(factory: Factory, capacity: int, trace: str, expected: str) -> None:
    assert hits(factory(capacity, trace.split()), trace) == expected


def test_arc_adapts_p_both_ways() -> None:
    """A hit in B1 grows T1's target, a hit in B2 shrinks it. By hand: d pushes a to B1;
    a's return sets p = 1 and pushes b to B1; y pushes c; b's return sets p = 2 and, T1 no
    longer over p, pushes x from T2 to B2; x's return sets p = 1 and pushes d to B1."""
    arc = ARC(4)
    ps = []
    for key in ["x", "x", "a", "b", "c", "d", "a", "y", "b", "x"]:
        arc.access(key, 1)
        ps.append(arc.p)
    assert ps == [0, 0, 0, 0, 0, 0, 1, 1, 2, 1]
    assert list(arc.t2) == ["a", "b", "x"]
    assert list(arc.b1) == ["c", "d"]


def test_s3fifo_one_hit_wonders_never_enter_main() -> None:
    s3 = S3FIFO(10)
    assert hits(s3, " ".join(f"k{i}" for i in range(50))) == "-" * 50
    assert s3.moved_to_main == 0 and len(s3.main) == 0
    assert len(s3.ghost) == 9  # as many as main can hold
    assert s3.used == 10


def test_s3fifo_a_key_hit_in_small_moves_to_main_and_outlives_a_scan() -> None:
    s3 = S3FIFO(10)
    scan = " ".join(f"k{i}" for i in range(30))
    assert hits(s3, f"h h {scan} h") == "-H" + "-" * 30 + "H"
    assert s3.in_main("h") and s3.moved_to_main == 1


def test_s3fifo_a_ghost_goes_straight_to_main() -> None:
    s3 = S3FIFO(10)
    keys = " ".join(str(i) for i in range(11))  # "0" leaves S for the ghost
    assert hits(s3, f"{keys} 0") == "-" * 12
    assert s3.in_main("0") and s3.ghost_admissions == 1


def test_s3fifo_protect_skips_small() -> None:
    s3 = S3FIFO(10, protect=lambda key: key == "meta")
    s3.access("meta", 1)
    s3.access("other", 1)
    assert s3.in_main("meta") and not s3.in_main("other")


def test_wtinylfu_frequent_key_outlives_a_scan_by_admission() -> None:
    cache = WTinyLFU(100, expected_entries=100)
    scan = " ".join(f"k{i}" for i in range(500))
    assert hits(cache, f"hot hot hot hot hot {scan} hot") == "-HHHH" + "-" * 500 + "H"
    assert cache.rejected > 0


def test_sketch_counts_saturate_and_halve_on_reset() -> None:
    sketch = FrequencySketch(16, sample_factor=100)
    for _ in range(20):
        sketch.increment("a")
    assert sketch.estimate("a") == 15
    assert sketch.estimate("never") == 0
    sketch.reset()
    assert sketch.estimate("a") == 7


def test_sketch_resets_after_its_sample() -> None:
    sketch = FrequencySketch(16, sample_factor=2)  # resets every 32 additions
    for i in range(32):
        sketch.increment(i % 4)
    assert sketch.resets == 1 and sketch.additions == 16


def test_doorkeeper_absorbs_the_first_access() -> None:
    sketch = FrequencySketch(64, doorkeeper=True)
    sketch.increment("a")
    assert sketch.estimate("a") == 1
    sketch.increment("a")
    assert sketch.estimate("a") == 2
    sketch.reset()
    assert sketch.estimate("a") == 0  # the doorkeeper is cleared, the counter halved to 0


def test_unknown_policy_is_named() -> None:
    with pytest.raises(ValueError, match="unknown policy 'mru'"):
        make("mru", CacheSpec(4, 1))


def test_belady_refuses_another_trace() -> None:
    belady = Belady(2, ["a", "b"])
    belady.access("a", 1)
    with pytest.raises(ValueError, match="another key"):
        belady.access("c", 1)


unit_traces = st.lists(st.integers(0, 7), min_size=1, max_size=80)


@settings(max_examples=150, deadline=None)
@given(keys=unit_traces, capacity=st.integers(1, 6))
def test_belady_is_never_worse_than_any_policy(keys: list[int], capacity: int) -> None:
    spec = CacheSpec(capacity, 1, keys)
    misses = {}
    for name in POLICIES:
        policy = make(name, spec)
        misses[name] = sum(not policy.access(k, 1) for k in keys)
    assert misses["belady"] == min(misses.values()), misses


@settings(max_examples=100, deadline=None)
@given(keys=st.lists(st.integers(0, 15), min_size=1, max_size=120), capacity=st.integers(1, 12))
def test_hits_are_the_resident_keys_and_capacity_holds(keys: list[int], capacity: int) -> None:
    """Sizes 1-3 bytes by key; a key too big for the cache is never kept."""
    spec = CacheSpec(capacity, 1, keys, frozenset(k for k in keys if k % 5 == 0))
    for name in POLICIES:
        policy = make(name, spec)
        for key in keys:
            resident = key in policy
            assert policy.access(key, 1 + key % 3) == resident, name
            assert 0 <= policy.used <= capacity, name
            assert len(policy) <= capacity, name


@pytest.mark.parametrize(
    ("offset", "length", "block", "size", "expected"),
    [
        (0, 1, 4, None, [(0, 4)]),
        (3, 2, 4, None, [(0, 4), (1, 4)]),
        (4, 4, 4, None, [(1, 4)]),
        (8, 5, 4, 10, [(2, 2)]),  # stops at the object's end; the last block is short
        (0, 0, 4, None, []),
        (12, 3, 4, 10, []),  # past the end
    ],
)
def test_blocks_of_range(
    offset: int, length: int, block: int, size: int | None, expected: list[tuple[int, int]]
) -> None:
    assert blocks_of_range(offset, length, block, size) == expected


def test_jsonl_round_trip_and_range_records(tmp_path: Path) -> None:
    trace = Trace("t", [Access("o", 0, 4, 0.5, "meta"), Access("o", 3, 2, 1.0)], block_size=4)
    dump_jsonl(trace, tmp_path / "t.jsonl")
    assert load_jsonl(tmp_path / "t.jsonl", block_size=4).accesses == trace.accesses
    (tmp_path / "r.jsonl").write_text(
        "# a comment\n\n"
        + json.dumps({"object": "o", "offset": 2, "length": 5, "size": 7, "time": 2}) + "\n"
    )  # fmt: skip
    assert load_jsonl(tmp_path / "r.jsonl", block_size=4).accesses == [
        Access("o", 0, 4, 2.0),
        Access("o", 1, 3, 2.0),
    ]


def test_jsonl_bad_record_names_its_line(tmp_path: Path) -> None:
    (tmp_path / "bad.jsonl").write_text('{"object": "o", "block": 0}\n{"block": 1}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2"):
        load_jsonl(tmp_path / "bad.jsonl")


SMALL = LabMix(files=12, users=4, sessions=40, scans=1, largest_file=8 * 1024 * 1024)


def test_lab_mix_is_deterministic_and_in_time_order() -> None:
    a, b, c = lab_mix(SMALL, seed=1), lab_mix(SMALL, seed=1), lab_mix(SMALL, seed=2)
    assert a.accesses == b.accesses and a.accesses != c.accesses
    assert [x.time for x in a.accesses] == sorted(x.time for x in a.accesses)
    assert {x.kind for x in a.accesses} == {"meta", "slice", "scan"}
    assert all(0 < x.bytes <= a.block_size for x in a.accesses)
    assert 0 < a.reused_footprint() < a.footprint()


def test_scan_scenario_shape() -> None:
    trace = scan_scenario()
    assert len(trace) == 24 * 3 + 1024 + 24 and trace.marks["after_scan"] == 24 * 3 + 1024
    warm = scan_scenario(prefill=64 * 1024 * 1024)
    assert warm.name == "scan-warm" and len(warm) == len(trace) + 2 * 256


def test_scan_test_lru_loses_everything_scan_resistant_ones_nothing() -> None:
    result = simulate.scan_test(["lru", "s3fifo", "arc", "wtinylfu", "belady"])
    assert result["lru"] == {"files": 24, "resident_after_scan": 0, "refetched": 24}
    for name in ("s3fifo", "arc", "wtinylfu", "belady"):
        assert result[name]["refetched"] == 0, name


def test_run_trace_reports_every_policy_and_size() -> None:
    trace = lab_mix(SMALL, seed=3)
    results = simulate.run_trace(trace, list(POLICIES), [0.2, 1.0], log=False)
    assert len(results) == 2 * len(POLICIES)
    for r in results:
        assert 0 <= r.byte_miss_ratio <= 1 and 0 <= r.meta_miss_ratio <= 1
        assert r.meta_accesses == sum(a.kind == "meta" for a in trace.accesses)
    text = simulate.tables(results, trace)
    assert "| s3fifo |" in text and "Misses against LRU" in text


def test_main_on_a_recorded_trace(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    keys = ["a", "b", "a", "c", "a", "b", "d", "a", "b"]
    trace = Trace("rec", [Access(k, 0, 1024) for k in keys], block_size=1024)
    dump_jsonl(trace, tmp_path / "rec.jsonl")
    argv = ["--no-mixes", "--trace", str(tmp_path / "rec.jsonl"), "--block-size", "1024"]
    assert simulate.main([*argv, "--sizes", "0.5", "--out", str(tmp_path), "--quiet"]) == 0
    payload = json.loads((tmp_path / "results.json").read_text())
    assert {r["policy"] for r in payload["results"]} == set(POLICIES)
    assert payload["scan_test"]["scan"]["lru"]["refetched"] == 24
    assert "**rec**" in (tmp_path / "results.md").read_text()
    assert "wrote" in capsys.readouterr().out


def test_scan_test_heads_read_once_only_block0_protection_keeps_them() -> None:
    """Read once before the scan, a head looks like a scan block to every online policy;
    admitting block 0 straight to S3-FIFO's main queue keeps it, as the optimum does."""
    trace = scan_scenario(rounds=1)
    assert trace.name == "scan-1x"
    result = simulate.scan_test(["s3fifo", "s3fifo-b0", "arc", "belady"], trace=trace)
    assert {name: row["refetched"] for name, row in result.items()} == {
        "s3fifo": 24,
        "s3fifo-b0": 0,
        "arc": 24,
        "belady": 0,
    }
