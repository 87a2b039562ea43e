"""deploy/: the files parse, agree with each other and with the daemon.

The dashboard JSON and Grafana provisioning, the compose stack (every mounted
file exists; its Prometheus config checked by promtool as the container sees
it), the Dockerfile (what it copies suffices to build the package; its
HEALTHCHECK command run against a real daemon), the example TOML (loads, and
starts the real daemon), the systemd unit (hardening; `systemd-analyze verify`
and `security` when systemd-analyze is installed) and deploy/README.md.
Grafana and Docker do not run here: their files are checked, not run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml  # type: ignore[import-untyped]
from prometheus_client.parser import text_string_to_metric_families

from nwbcache_proxy.config import Settings
from nwbcache_proxy.flags import add_serve_arguments, load_settings
from tests.support.daemons import DaemonProcess, DaemonThread
from tests.support.helpers import REPO
from tests.support.helpers import system_tool as tool

DEPLOY = REPO / "deploy"
DASHBOARD = DEPLOY / "grafana" / "nwbcache-dashboard.json"
PROVISIONING = DEPLOY / "grafana" / "provisioning"
COMPOSE = DEPLOY / "docker" / "compose.yaml"
DOCKERFILE = DEPLOY / "docker" / "Dockerfile"
EXAMPLE_TOML = DEPLOY / "nwbcache.example.toml"
UNIT = DEPLOY / "systemd" / "nwbcache.service"
SYSUSERS = DEPLOY / "systemd" / "nwbcache.sysusers"
README = DEPLOY / "README.md"
DS_UID = "${DS_PROMETHEUS}"


def serve_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    return parser


# -------------------------------------------------------------------- Grafana


def all_panels(panels: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for panel in panels:
        out.append(panel)
        out.extend(all_panels(panel.get("panels", [])))
    return out


def test_dashboard_is_valid_and_every_panel_queries_prometheus() -> None:
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] and dash["title"] and isinstance(dash["schemaVersion"], int)
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"
    panels = all_panels(dash["panels"])
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    queried = [p for p in panels if p["type"] != "row"]
    assert len(queried) >= 10
    boxes = []
    for panel in queried:
        title = panel["title"]
        assert panel["datasource"] == {"type": "prometheus", "uid": DS_UID}, title
        assert panel["targets"], f"panel {title!r} has no target"
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), title
        for target in panel["targets"]:
            assert target["expr"].strip(), title
            assert target["datasource"]["uid"] == DS_UID, title
            assert 'job="nwbcache"' in target["expr"] or "job=" not in target["expr"], title
        pos = panel["gridPos"]
        assert pos["x"] >= 0 and pos["w"] > 0 and pos["x"] + pos["w"] <= 24, title
        boxes.append((title, pos))
    for i, (t1, a) in enumerate(boxes):  # no two panels on top of each other
        for t2, b in boxes[i + 1 :]:
            apart = (
                a["x"] + a["w"] <= b["x"]
                or b["x"] + b["w"] <= a["x"]
                or a["y"] + a["h"] <= b["y"]
                or b["y"] + b["h"] <= a["y"]
            )
            assert apart, f"panels {t1!r} and {t2!r} overlap"


def test_dashboard_has_the_panels_the_lab_needs() -> None:
    panels = all_panels(json.loads(DASHBOARD.read_text())["panels"])
    exprs = {p["title"]: "\n".join(t["expr"] for t in p.get("targets", [])) for p in panels}

    def panel(title: str) -> str:
        assert title in exprs, f"no panel {title!r}"
        return exprs[title]

    hit = panel("Hit ratio: by bytes and by requests")
    assert "nwbcache_served_bytes_total" in hit and 'source="cache"' in hit
    # a STALE answer (cached bytes upstream has not confirmed) is served from the cache too
    assert "nwbcache_requests_total" in hit and 'cache=~"hit|stale"' in hit
    assert "by (source)" in panel("Bytes served by source")
    first_byte = panel("Upstream first-byte latency p50 / p99")
    assert "histogram_quantile(0.5," in first_byte and "histogram_quantile(0.99," in first_byte
    assert "nwbcache_upstream_first_byte_seconds_bucket" in first_byte
    assert "by (reason)" in panel("Upstream retries by reason")
    assert 'outcome!="ok"' in panel("Upstream errors by outcome")
    fill = panel("Cache fill against capacity")
    assert "nwbcache_cache_size_bytes" in fill and "nwbcache_cache_capacity_bytes" in fill
    evictions = panel("Evictions")
    assert "nwbcache_cache_evictions_total" in evictions
    assert "nwbcache_cache_evictions_recent_total" in evictions
    assert "nwbcache_inflight_requests" in panel("In-flight requests")
    assert "by (status)" in panel("Request rate by status")


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def test_grafana_provisioning_parses_and_matches_the_compose_mounts() -> None:
    datasources = load_yaml(PROVISIONING / "datasources" / "prometheus.yaml")
    assert datasources["apiVersion"] == 1
    (ds,) = datasources["datasources"]
    assert ds["type"] == "prometheus" and ds["isDefault"] is True and ds["access"] == "proxy"
    dashboards = load_yaml(PROVISIONING / "dashboards" / "nwbcache.yaml")
    assert dashboards["apiVersion"] == 1
    (provider,) = dashboards["providers"]
    assert provider["type"] == "file"

    grafana = load_yaml(COMPOSE)["services"]["grafana"]
    mounts = container_files(grafana)
    # The provider's path holds the dashboard JSON, inside the container.
    in_dir = [
        src
        for dst, src in mounts.items()
        if dst.parent == Path(provider["options"]["path"]) and dst.suffix == ".json"
    ]
    assert [p.resolve() for p in in_dir] == [DASHBOARD.resolve()]
    for sub in ("datasources", "dashboards"):
        src = mounts.get(Path("/etc/grafana/provisioning") / sub)
        assert src is not None and src.resolve() == (PROVISIONING / sub).resolve(), sub
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert mounts[Path(home)].resolve() == DASHBOARD.resolve()
    # The data source is the compose stack's Prometheus.
    services = load_yaml(COMPOSE)["services"]
    host_port = ds["url"].removeprefix("http://")
    assert host_port == "prometheus:9090" and "prometheus" in services


# -------------------------------------------------------------------- compose


def container_files(service: dict[str, Any]) -> dict[Path, Path]:
    """Bind mounts of a compose service: container path -> host path (relative
    sources resolved against the compose file's directory)."""
    out = {}
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith((".", "/")):
            out[Path(target)] = COMPOSE.parent / source
    return out


def test_compose_parses_and_every_mounted_file_exists() -> None:
    compose = load_yaml(COMPOSE)
    services = compose["services"]
    assert {"nwbcache", "prometheus", "grafana"} <= set(services)
    build = services["nwbcache"]["build"]
    context = (COMPOSE.parent / build["context"]).resolve()
    assert context == REPO
    assert (context / build["dockerfile"]).resolve() == DOCKERFILE.resolve()
    named = set(compose.get("volumes") or {})
    for name, service in services.items():
        assert "image" in service, name  # pinned images, or the built image's name
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith((".", "/")):
                assert (COMPOSE.parent / source).exists(), f"{name}: {source} does not exist"
            else:
                assert source in named, f"{name}: volume {source} is not declared"
    cache_dir = dockerfile_env()["NWBCACHE_CACHE_DIR"]
    targets = [v.split(":")[1] for v in services["nwbcache"]["volumes"]]
    assert cache_dir in targets, "the cache must live in a volume"


@pytest.mark.slow
def test_compose_prometheus_config_checks_as_the_container_sees_it(tmp_path: Path) -> None:
    """Lay the prometheus service's mounts out under a temp root and let
    promtool check the config there: rule_files must resolve like in the container."""
    service = load_yaml(COMPOSE)["services"]["prometheus"]
    root = tmp_path / "root"
    for target, source in container_files(service).items():
        if source.is_file():
            dest = root / target.relative_to("/")
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(source, dest)
    flags = dict(arg.removeprefix("--").split("=", 1) for arg in service["command"])
    config_path = root / Path(flags["config.file"]).relative_to("/")
    done = subprocess.run(
        [tool("promtool"), "check", "config", str(config_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 rule files found" in done.stdout + done.stderr
    config = yaml.safe_load(config_path.read_text())
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "nwbcache"]
    port = dockerfile_env()["NWBCACHE_PORT"]
    assert job["static_configs"] == [{"targets": [f"nwbcache:{port}"]}]


# ----------------------------------------------------------------- Dockerfile


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def dockerfile_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for word, rest in dockerfile_instructions():
        if word == "ENV":
            for item in shlex.split(rest):
                key, _, value = item.partition("=")
                env[key] = value
    return env


def test_dockerfile_is_slim_non_root_and_listens_on_every_interface() -> None:
    instructions = dockerfile_instructions()
    words = [w for w, _ in instructions]
    assert instructions[0] == ("FROM", "python:3.11-slim")
    env = dockerfile_env()
    assert env["NWBCACHE_HOST"] == "0.0.0.0"
    user = [rest for w, rest in instructions if w == "USER"]
    assert user and user[-1] not in ("root", "0")
    assert words.index("USER") > max(i for i, w in enumerate(words) if w == "RUN")
    (volume,) = [json.loads(rest) for w, rest in instructions if w == "VOLUME"]
    assert volume == [env["NWBCACHE_CACHE_DIR"]]
    s3_port = env["NWBCACHE_S3_LISTEN"].rpartition(":")[2]
    assert env["NWBCACHE_S3_LISTEN"].startswith("0.0.0.0:")
    assert [rest for w, rest in instructions if w == "EXPOSE"] == [
        f"{env['NWBCACHE_PORT']} {s3_port}"
    ]
    (entry,) = [json.loads(rest) for w, rest in instructions if w == "ENTRYPOINT"]
    assert entry == ["nwbcache", "serve"]
    # Settings through the environment load like the daemon will load them.
    settings = load_settings(serve_parser().parse_args([]), environ=env)
    assert settings.host == "0.0.0.0" and str(settings.cache_dir) == env["NWBCACHE_CACHE_DIR"]


def test_dockerfile_copies_everything_the_package_build_needs() -> None:
    copied = []
    for word, rest in dockerfile_instructions():
        if word == "COPY":
            copied.extend(shlex.split(rest)[:-1])
    for source in copied:
        assert (REPO / source).exists(), f"COPY {source}: not in the build context"
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    hatch_wheel = pyproject["tool"]["hatch"]["build"]["targets"]["wheel"]
    needed = [
        pyproject["project"]["readme"],
        "pyproject.toml",
        pyproject["tool"]["hatch"]["version"]["path"],
        *hatch_wheel["packages"],
        *hatch_wheel.get("force-include", {}),
    ]
    for path in needed:
        assert any(path == c or path.startswith(c.rstrip("/") + "/") for c in copied), path
    # BuildKit's Dockerfile-specific ignore file lets those through.
    ignore = (DOCKERFILE.parent / "Dockerfile.dockerignore").read_text().splitlines()
    for source in copied:
        assert f"!{source.rstrip('/')}" in {line.rstrip("/") for line in ignore}, source


def healthcheck_command() -> list[str]:
    (rest,) = [rest for w, rest in dockerfile_instructions() if w == "HEALTHCHECK"]
    command = json.loads(rest[rest.index("CMD") + 3 :])
    assert isinstance(command, list) and command[0] == "python"
    return [sys.executable, *command[1:]]


@pytest.mark.slow
def test_dockerfile_healthcheck_asks_healthz(
    make_daemon: Callable[..., DaemonThread], tmp_path: Path
) -> None:
    daemon = make_daemon()
    port = daemon.url.rsplit(":", 1)[1]
    env = {**os.environ, "NWBCACHE_PORT": port, "HTTP_PROXY": "http://127.0.0.1:9"}
    ok = subprocess.run(healthcheck_command(), env=env, capture_output=True, timeout=30)
    assert ok.returncode == 0, ok.stderr
    daemon.stop()
    down = subprocess.run(healthcheck_command(), env=env, capture_output=True, timeout=30)
    assert down.returncode != 0


# --------------------------------------------------------------- example TOML


def test_example_toml_loads_and_documents_every_setting() -> None:
    args = serve_parser().parse_args(["--config", str(EXAMPLE_TOML)])
    settings = load_settings(args, environ={})
    keys = list(tomllib.loads(EXAMPLE_TOML.read_text()))
    fields = [f.name for f in dataclasses.fields(Settings)]
    assert sorted(keys) == sorted(fields), "the example must show every setting"
    lines = EXAMPLE_TOML.read_text().splitlines()
    for i, line in enumerate(lines):
        if re.match(r"^[a-z_]+ = ", line):
            assert lines[i - 1].startswith("#"), f"{line!r} has no comment above it"
    # What the systemd unit and the README rely on.
    assert str(settings.cache_dir) == "/var/cache/" + unit_value("CacheDirectory")
    assert settings.host != "127.0.0.1", "a lab server must listen on the network"


@pytest.mark.slow
def test_example_toml_starts_the_real_daemon(tmp_path: Path) -> None:
    # The file as is, but on loopback, a free port and a temp cache directory.
    daemon = DaemonProcess(
        ["--config", str(EXAMPLE_TOML), "--host", "127.0.0.1", "--cache-dir", str(tmp_path)]
    ).start()
    try:
        r = requests.get(f"{daemon.url}/healthz", timeout=10)
        assert r.status_code == 200 and r.json()["status"] == "ok"
        text = requests.get(f"{daemon.url}/metrics", timeout=10).text
        (capacity,) = [
            s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
            if s.name == "nwbcache_cache_capacity_bytes"
        ]
        args = serve_parser().parse_args(["--config", str(EXAMPLE_TOML)])
        assert capacity == load_settings(args, environ={}).cache_size
    finally:
        assert daemon.terminate() == 0


# -------------------------------------------------------------------- systemd


def unit_entries() -> list[tuple[str, str, str]]:
    """(section, key, value) of the unit, repeated keys kept."""
    section = ""
    out = []
    for line in UNIT.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        out.append((section, key.strip(), value.strip()))
    return out


def unit_value(key: str) -> str:
    values = [v for _, k, v in unit_entries() if k == key]
    assert values, f"{key}= missing from {UNIT.name}"
    return values[-1]


def test_systemd_unit_is_hardened_and_runs_the_daemon_with_the_config() -> None:
    entries = unit_entries()
    assert {s for s, _, _ in entries} == {"Unit", "Service", "Install"}
    expect = {
        "User": "nwbcache",
        "ProtectSystem": "strict",
        "NoNewPrivileges": "yes",
        "PrivateTmp": "yes",
        "ProtectHome": "yes",
        "PrivateDevices": "yes",
        "Restart": "on-failure",
        "CacheDirectory": "nwbcache",
        "CapabilityBoundingSet": "",
    }
    for key, value in expect.items():
        assert unit_value(key) == value, key
    families = unit_value("RestrictAddressFamilies").split()
    # asyncio's self-pipe is an AF_UNIX socketpair; upstream and clients are IP.
    assert {"AF_UNIX", "AF_INET", "AF_INET6"} <= set(families)
    assert "DynamicUser" not in {k for _, k, _ in entries}
    # The user the unit runs as is the one sysusers creates.
    sysusers = [ln.split() for ln in SYSUSERS.read_text().splitlines() if ln.startswith("u ")]
    assert [u[1] for u in sysusers] == [unit_value("User")]
    # ExecStart: the serve command, with the config the README installs.
    exec_start = shlex.split(unit_value("ExecStart"))
    binary, command, *flags = exec_start
    assert binary == "/opt/nwbcache/bin/nwbcache" and command == "serve"
    args = serve_parser().parse_args(flags)
    config = Path(args.config)
    assert config == Path("/etc") / unit_value("ConfigurationDirectory") / "nwbcache.toml"
    readme = README.read_text()
    assert "python3 -m venv /opt/nwbcache" in readme
    assert f"{EXAMPLE_TOML.relative_to(REPO)} {config}" in readme


def systemd_analyze() -> str:
    path = shutil.which("systemd-analyze")
    assert path is not None, "systemd-analyze is missing: run scripts/install-test-deps.sh"
    return path


def verifiable_unit(tmp_path: Path) -> Path:
    """The unit with ExecStart's /opt/nwbcache venv replaced by this one (verify
    checks that the binary exists)."""
    venv_bin = Path(sys.executable).parent / "nwbcache"
    assert venv_bin.exists()
    unit = tmp_path / UNIT.name
    unit.write_text(UNIT.read_text().replace("/opt/nwbcache/bin/nwbcache", str(venv_bin)))
    return unit


@pytest.mark.slow
def test_systemd_analyze_verify(tmp_path: Path) -> None:
    unit = verifiable_unit(tmp_path)
    done = subprocess.run(
        [systemd_analyze(), "verify", "--man=no", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    # verify exits 0 on unknown keys, only warning: any output is a failure.
    assert done.returncode == 0 and not (done.stdout + done.stderr).strip(), (
        done.stdout + done.stderr
    )


@pytest.mark.slow
def test_systemd_analyze_security_rates_the_unit_ok(tmp_path: Path) -> None:
    unit = verifiable_unit(tmp_path)
    done = subprocess.run(
        [systemd_analyze(), "security", "--offline=true", "--no-pager", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    m = re.search(r"Overall exposure level for \S+: ([\d.]+)", done.stdout)
    assert m is not None, done.stdout + done.stderr
    assert float(m.group(1)) < 2.0, done.stdout


# --------------------------------------------------------------------- README


def test_readme_tells_a_lab_how_to_run_point_and_watch() -> None:
    text = README.read_text()
    assert text.startswith("# Run it for your lab")
    for needed in (
        "systemctl enable --now nwbcache",
        "docker compose up",
        "NWBCACHE_URL=http://",
        ":8080",
        "/healthz",
        "GET /",
        "nwbcache status",
        "Grafana",
    ):
        assert needed in text, needed
    for alert in re.findall(r"\| (Nwbcache\w+) \|", text):
        assert alert in (DEPLOY / "prometheus" / "alerts.yml").read_text()
    for path in re.findall(r"deploy/[\w./-]+\w", text):
        assert (REPO / path).exists(), path
    listed = re.findall(r"^  ([\w.-]+(?:/[\w./-]*)?)\s{2,}", text, re.MULTILINE)
    assert listed
    for path in listed:
        assert (DEPLOY / path).exists(), path
