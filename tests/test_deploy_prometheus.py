"""deploy/prometheus and deploy/grafana against the real tools and a real daemon.

promtool checks the config and the rules and runs the rules' unit tests; then
a real Prometheus (Debian's binary) scrapes a real daemon through a workload
of known shape, and every query of the Grafana dashboard and of the alert
rules is evaluated by it. promtool and prometheus come from
scripts/install-test-deps.sh: without them these tests fail, never skip.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml  # type: ignore[import-untyped]
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from nwbcache_proxy.metrics import Metrics
from tests.support.daemons import DaemonThread
from tests.support.helpers import REPO, free_port, proxied, wait_until
from tests.support.helpers import system_tool as tool
from tests.support.s3emu import Fault, S3Emulator

PROM_DIR = REPO / "deploy" / "prometheus"
CONFIG = PROM_DIR / "prometheus.yml"
ALERTS = PROM_DIR / "alerts.yml"
ALERTS_TEST = PROM_DIR / "alerts_test.yml"
DASHBOARD = REPO / "deploy" / "grafana" / "nwbcache-dashboard.json"

REQUIRED_ALERTS = {
    "NwbcacheDown",
    "NwbcacheUpstreamErrorRatioHigh",
    "NwbcacheRetryRateHigh",
    "NwbcacheCacheNearlyFull",
    "NwbcacheCacheThrashing",
    "NwbcacheLowHitRatio",
    "NwbcacheUpstreamCircuitOpen",
}

BS = 64 * 1024
CACHE_BLOCKS = 12
KEY_A = "/dandiarchive/blobs/de/pl/oy-a"  # 8 blocks: read cold, then warm
KEY_B = "/dandiarchive/blobs/de/pl/oy-b"  # 16 blocks: more than the cache holds
DATA_A = os.urandom(8 * BS)
DATA_B = os.urandom(16 * BS)
SLOWDOWNS = 3


def run_promtool(*args: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [tool("promtool"), *args], capture_output=True, text=True, timeout=60, cwd=REPO
    )
    assert done.returncode == 0, f"promtool {' '.join(args)}:\n{done.stdout}\n{done.stderr}"
    return done


def alert_rules() -> dict[str, dict[str, Any]]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return {r["alert"]: r for g in groups for r in g["rules"] if "alert" in r}


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, expr) of every target of every panel, rows' nested panels included."""
    dash = json.loads(DASHBOARD.read_text())
    out: list[tuple[str, str]] = []

    def walk(panels: list[dict[str, Any]]) -> None:
        for panel in panels:
            walk(panel.get("panels", []))
            for target in panel.get("targets", []):
                out.append((panel["title"], target["expr"]))

    walk(dash["panels"])
    return out


def variable_queries() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    out = []
    for var in dash["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]
            out.append(query["query"] if isinstance(query, dict) else query)
    return out


# ------------------------------------------------------------------- promtool


@pytest.mark.slow
def test_promtool_check_config() -> None:
    out = run_promtool("check", "config", str(CONFIG))
    assert "1 rule files found" in out.stdout + out.stderr


@pytest.mark.slow
def test_promtool_check_rules() -> None:
    out = run_promtool("check", "rules", str(ALERTS))
    assert f"{len(alert_rules())} rules found" in out.stdout + out.stderr


@pytest.mark.slow
def test_promtool_test_rules() -> None:
    out = run_promtool("test", "rules", str(ALERTS_TEST))
    assert "SUCCESS" in out.stdout + out.stderr


def test_every_alert_is_labelled_annotated_and_unit_tested_both_ways() -> None:
    rules = alert_rules()
    assert set(rules) == REQUIRED_ALERTS
    for name, rule in rules.items():
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}, name
        assert rule["annotations"]["summary"].strip(), name
        assert rule["annotations"]["description"].strip(), name
        assert "for" in rule, f"{name} fires on a single evaluation"
    tests = yaml.safe_load(ALERTS_TEST.read_text())["tests"]
    firing: set[str] = set()
    silent: set[str] = set()
    for case in tests:
        for check in case.get("alert_rule_test", []):
            (firing if check.get("exp_alerts") else silent).add(check["alertname"])
    assert firing == REQUIRED_ALERTS, "alerts without a firing unit test"
    assert silent == REQUIRED_ALERTS, "alerts without a not-firing unit test"


# ------------------------------------------------- alert expressions, taken apart

_SPLIT = re.compile(r"==|!=|>=|<=|>|<|\band\b|\bor\b|\bunless\b")
_MODIFIERS = re.compile(
    r"^(bool\b|(on|ignoring|group_left|group_right)\s*(\([^)]*\))?)\s*", re.IGNORECASE
)
_NUMBER = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


def operands(expr: str) -> list[str]:
    """The operands of the top-level comparison and set operators of a PromQL
    expression (what an alert compares), numbers left out."""
    parts: list[str] = []
    depth, start, i, quote = 0, 0, 0, ""
    while i < len(expr):
        c = expr[i]
        if quote:
            if c == "\\":
                i += 2
                continue
            if c == quote:
                quote = ""
        elif c in "\"'`":
            quote = c
        elif c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        elif depth == 0 and (m := _SPLIT.match(expr, i)) is not None:
            parts.append(expr[start:i])
            start = i = m.end()
            continue
        i += 1
    parts.append(expr[start:])
    out = []
    for part in parts:
        part = part.strip()
        while (m := _MODIFIERS.match(part)) is not None and m.end() > 0:
            part = part[m.end() :].strip()
        if part and not _NUMBER.match(part):
            out.append(part)
    return out


def test_operands_of_alert_expressions() -> None:
    assert operands('up{job="x"} == 0 or absent(up{job="x"})') == [
        'up{job="x"}',
        'absent(up{job="x"})',
    ]
    assert operands('(a{l=~"x|y"} / b) > 0.05\nand on(i) sum by (i) (c{o!="ok"}) > 1e3') == [
        '(a{l=~"x|y"} / b)',
        'sum by (i) (c{o!="ok"})',
    ]
    assert operands("rate(x[5m]) > bool 0") == ["rate(x[5m])"]
    for name, rule in alert_rules().items():
        assert operands(rule["expr"]), name


# ------------------------------------------------------ a real Prometheus, scraping


class Prometheus:
    def __init__(self, url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
        self.url = url
        self.proc = proc
        self.log = log

    def api(self, path: str, **params: Any) -> Any:
        r = requests.get(f"{self.url}/api/v1/{path}", params=params, timeout=10)
        body = r.json()
        assert r.status_code == 200 and body["status"] == "success", (path, params, body)
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        data = self.api("query", query=expr)
        assert data["resultType"] == "vector", (expr, data)
        return list(data["result"])

    def value(self, expr: str) -> float:
        result = self.query(expr)
        assert len(result) == 1, (expr, result)
        return float(result[0]["value"][1])

    def wait_for(self, expr: str, want: float, timeout: float = 10.0) -> float:
        """Poll until `expr` (one sample) equals `want`; return the last value seen."""
        seen = [math.nan]

        def settled() -> bool:
            result = self.query(expr)
            if len(result) == 1:
                seen[0] = float(result[0]["value"][1])
            return seen[0] == want

        wait_until(settled, timeout, interval=0.2)
        return seen[0]


@pytest.fixture
def daemon(make_daemon: Callable[..., DaemonThread], origin: S3Emulator) -> DaemonThread:
    origin.put(KEY_A, DATA_A)
    origin.put(KEY_B, DATA_B)
    return make_daemon(block_size=BS, cache_size=CACHE_BLOCKS * BS)


@pytest.fixture
def prometheus(daemon: DaemonThread, tmp_path: Path) -> Iterator[Prometheus]:
    """Debian's prometheus with deploy/prometheus/prometheus.yml, made fast and
    pointed at the test daemon: 1 s scrapes and rule evaluations."""
    binary = tool("prometheus")
    config = yaml.safe_load(CONFIG.read_text())
    config["global"].update(scrape_interval="1s", evaluation_interval="1s", scrape_timeout="1s")
    config["rule_files"] = [str((CONFIG.parent / f).resolve()) for f in config["rule_files"]]
    jobs = [job for job in config["scrape_configs"] if job["job_name"] == "nwbcache"]
    assert len(jobs) == 1, "prometheus.yml has no (single) nwbcache job"
    jobs[0]["static_configs"] = [{"targets": [daemon.url.removeprefix("http://")]}]
    config["scrape_configs"] = jobs
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log = tmp_path / "prometheus.log"
    with log.open("wb") as fh:
        proc = subprocess.Popen(
            [
                binary,
                f"--config.file={tmp_path / 'prometheus.yml'}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ],
            stdout=fh,
            stderr=subprocess.STDOUT,
            cwd=tmp_path,
        )
    prom = Prometheus(f"http://127.0.0.1:{port}", proc, log)

    def ready() -> bool:
        assert proc.poll() is None, f"prometheus exited:\n{log.read_text()}"
        try:
            return requests.get(f"{prom.url}/-/ready", timeout=2).status_code == 200
        except requests.ConnectionError:
            return False

    try:
        assert wait_until(ready, 30, interval=0.1), f"prometheus not ready:\n{log.read_text()}"
        # The first scrape (all counters at zero) comes before the workload.
        assert prom.wait_for('up{job="nwbcache"}', 1.0) == 1.0, log.read_text()
        yield prom
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def daemon_metrics(url: str) -> dict[str, float]:
    """The daemon's own /metrics: sums per sample name, and per name and one label."""
    out: dict[str, float] = {}
    text = requests.get(f"{url}/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[s.name] = out.get(s.name, 0.0) + s.value
            for k, v in sorted(s.labels.items()):
                key = f"{s.name}{{{k}={v}}}"
                out[key] = out.get(key, 0.0) + s.value
    return out


def substitute(expr: str, instance: str) -> str:
    """Grafana's template variables, as Grafana would expand them for this test."""
    values = {
        "$__rate_interval": "1m",
        "$__interval": "15s",
        "$__range": "5m",
        "${instance}": instance,  # a regex matcher: the dots match themselves too
        "$instance": instance,
    }
    for name in sorted(values, key=len, reverse=True):
        expr = expr.replace(name, values[name])
    assert "$" not in expr, f"unknown template variable in {expr!r}"
    return expr


def finite_values(data: dict[str, Any]) -> list[float]:
    vals = [float(v) for series in data["result"] for _, v in series["values"]]
    return [v for v in vals if math.isfinite(v)]


@pytest.mark.slow
def test_real_prometheus_scrapes_the_daemon_and_answers_every_dashboard_and_alert_query(
    origin: S3Emulator, daemon: DaemonThread, prometheus: Prometheus
) -> None:
    prom = prometheus
    started = time.time() - 2
    instance = daemon.url.removeprefix("http://")

    # -- cold: upstream throttles the first reads; B alone overflows the cache
    origin.inject(Fault.SLOWDOWN, count=SLOWDOWNS, method="GET")
    client_bytes = 0
    for key, data in ((KEY_B, DATA_B), (KEY_A, DATA_A)):
        r = requests.get(proxied(daemon.url, origin, key), timeout=30)
        assert r.status_code == 200 and r.content == data
        client_bytes += len(r.content)
    wait_until(
        lambda: daemon_metrics(daemon.url)["nwbcache_cache_evictions_total"] > 0,
        10,
        "an eviction pass",
        interval=0.2,
    )

    # -- barrier: Prometheus has scraped everything the cold phase did
    cache_expr = 'sum(nwbcache_served_bytes_total{job="nwbcache", source="cache"}) or vector(0)'
    before = daemon_metrics(daemon.url).get("nwbcache_served_bytes_total{source=cache}", 0.0)
    assert prom.wait_for(cache_expr, before) == before

    # -- warm: ranged reads of A, all from the cache, in two passes with a
    # scrape between (a labelled series is born at its first increment, which
    # rate() cannot see: the second pass is what the hit-ratio panels show)
    url_a = proxied(daemon.url, origin, KEY_A)
    ranges = [(start, start + 99_999) for start in range(0, len(DATA_A) - 100_000, 120_000)]
    warm_bytes = 0
    n_warm = 0
    for _ in range(2):
        for lo, hi in ranges:
            r = requests.get(url_a, headers={"Range": f"bytes={lo}-{hi}"}, timeout=30)
            assert r.status_code == 206 and r.headers["X-Cache"] == "HIT"
            assert r.content == DATA_A[lo : hi + 1]
            warm_bytes += len(r.content)
            n_warm += 1
        assert prom.wait_for(cache_expr, before + warm_bytes) == before + warm_bytes
    client_bytes += warm_bytes

    # -- Prometheus's counters agree with the workload
    assert prom.value('sum(nwbcache_served_bytes_total{job="nwbcache"})') == client_bytes
    object_bytes = sum(r.bytes_sent for r in origin.requests() if r.status < 300)
    assert prom.value("nwbcache_upstream_bytes_total") == object_bytes  # not the 503 bodies
    assert object_bytes == len(DATA_A) + len(DATA_B)  # each byte crossed "the WAN" once
    assert prom.value('nwbcache_upstream_retries_total{reason="throttled"}') == SLOWDOWNS
    assert prom.value('nwbcache_upstream_requests_total{outcome="throttled"}') == SLOWDOWNS
    upstream_requests = len(origin.requests())
    assert prom.value("sum(nwbcache_upstream_requests_total)") == upstream_requests
    assert prom.value("nwbcache_upstream_first_byte_seconds_count") == upstream_requests
    assert prom.value('sum(nwbcache_requests_total{cache="hit"})') == n_warm
    assert prom.value("sum(nwbcache_requests_total)") == n_warm + 2
    assert prom.value("nwbcache_request_duration_seconds_count") == n_warm + 2
    assert prom.value("nwbcache_cache_capacity_bytes") == CACHE_BLOCKS * BS
    assert 0 < prom.value("nwbcache_cache_size_bytes") <= CACHE_BLOCKS * BS
    assert prom.value("sum(nwbcache_cache_evictions_total)") > 0
    assert prom.value("nwbcache_cache_evictions_recent_total") > 0
    # S3-FIFO's view: blocks entered a queue, and main and small add up to the size.
    assert prom.value("sum(nwbcache_cache_admissions_total)") > 0
    assert prom.value("sum(nwbcache_cache_queue_bytes)") == prom.value("nwbcache_cache_size_bytes")
    assert prom.value("nwbcache_inflight_requests") == 0

    # -- every query of every dashboard panel returns numbers, once rate() has
    # two samples of every series (those born in the warm phase included)
    def fewest_samples() -> int:
        data = prom.api("query", query='{__name__=~"nwbcache_.+", job="nwbcache"}[5m]')
        return min(len(series["values"]) for series in data["result"])

    wait_until(lambda: fewest_samples() >= 3, 10, "three scrapes of every series", interval=0.2)
    dashboard_text = DASHBOARD.read_text()
    now = time.time()
    queries = dashboard_queries()
    assert queries
    for title, expr in queries:
        data = prom.api(
            "query_range", query=substitute(expr, instance), start=started, end=now, step="1s"
        )
        assert data["result"], f"panel {title!r}: no data for {expr}"
        assert finite_values(data), f"panel {title!r}: only NaN for {expr}"
    for query in variable_queries():
        m = re.fullmatch(r"\s*label_values\((.+),\s*(\w+)\)\s*", query)
        assert m is not None, f"variable query {query!r}"
        series = prom.api("series", **{"match[]": m.group(1), "start": started, "end": now})
        assert any(m.group(2) in s for s in series), f"variable {query!r}: no values"
    # ... and the dashboard shows every metric the daemon has.
    suffix = {"counter": "_total", "histogram": "_bucket", "gauge": ""}
    for family in Metrics(CollectorRegistry()).registry.collect():
        name = family.name + suffix[family.type]
        assert name in dashboard_text, f"{name} is on no dashboard panel"

    # -- every alert expression evaluates, and the series it compares exist
    for name, rule in alert_rules().items():
        prom.query(rule["expr"])  # parses and evaluates (status success)
        for operand in operands(rule["expr"]):
            result = prom.query(operand)
            if operand.startswith("absent("):
                assert result == [], f"{name}: {operand} while the target is up"
            else:
                assert result, f"{name}: no series for {operand}"

    # -- Prometheus evaluates the loaded rules without error, on real data:
    # B's read evicted blocks just read, so thrashing is pending (for: 15m).
    def states() -> dict[str, tuple[str, str, str]]:
        groups = prom.api("rules", type="alert")["groups"]
        return {
            r["name"]: (r["health"], r["state"], r.get("lastError", ""))
            for g in groups
            for r in g["rules"]
        }

    wait_until(
        lambda: states().get("NwbcacheCacheThrashing", ("", "", ""))[1] == "pending",
        10,
        f"NwbcacheCacheThrashing pending (rules: {states()})",
        interval=0.2,
    )
    rules = states()
    assert set(rules) == REQUIRED_ALERTS
    for name, (health, _state, error) in rules.items():
        assert health == "ok" and not error, (name, health, error)
    assert rules["NwbcacheDown"][1] == "inactive"
    assert rules["NwbcacheCacheNearlyFull"][1] == "inactive"
