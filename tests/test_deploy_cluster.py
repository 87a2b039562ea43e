"""deploy/cluster/kubernetes.yaml parses, agrees with itself and with the nginx config
that tests/test_cluster.py runs for real (Kubernetes itself does not run here)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml  # type: ignore[import-untyped]

from nwbcache.cli import build_parser
from nwbcache_proxy.flags import load_settings
from tests.support.balancers import CLUSTER, NGINX_CONF

KUBERNETES = CLUSTER / "kubernetes.yaml"
_SERVER = re.compile(r"^\s*server\s+(\S+)(.*);\s*$")


@pytest.fixture(scope="module")
def manifests() -> dict[tuple[str, str], dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all(KUBERNETES.read_text()) if d]
    by_kind_name = {(d["kind"], d["metadata"]["name"]): d for d in docs}
    assert len(by_kind_name) == len(docs), "two manifests with one kind and name"
    return by_kind_name


def _servers(conf: str) -> tuple[list[str], list[tuple[str, str]]]:
    """The config's lines with server lines taken out, and the (address, options) of those."""
    rest, servers = [], []
    for line in conf.splitlines():
        found = _SERVER.match(line)
        if found:
            servers.append((found[1], found[2]))
        else:
            rest.append(line)
    return rest, servers


def test_the_balancer_configmap_is_the_tested_nginx_config(
    manifests: dict[tuple[str, str], dict[str, Any]],
) -> None:
    shipped_rest, shipped_servers = _servers(NGINX_CONF.read_text())
    in_cluster = manifests[("ConfigMap", "nwbcache-balancer")]["data"]["nwbcache.conf"]
    rest, servers = _servers(in_cluster)
    assert rest == shipped_rest  # everything but the node list, line for line
    replicas = manifests[("StatefulSet", "nwbcache")]["spec"]["replicas"]
    assert [address for address, _ in servers] == [
        f"nwbcache-{i}.nwbcache:8080" for i in range(replicas)
    ]
    assert {options for _, options in servers} == {shipped_servers[0][1]}


def test_the_statefulset_runs_daemons_the_balancer_can_reach(
    manifests: dict[tuple[str, str], dict[str, Any]], tmp_path: Path
) -> None:
    headless = manifests[("Service", "nwbcache")]["spec"]
    sts = manifests[("StatefulSet", "nwbcache")]["spec"]
    pod = sts["template"]["spec"]
    (daemon,) = pod["containers"]
    assert headless["clusterIP"] == "None" and sts["serviceName"] == "nwbcache"
    assert headless["selector"].items() <= sts["template"]["metadata"]["labels"].items()
    # The daemon's own parser accepts the args (Kubernetes expands $(POD_NAME)).
    args = [a.replace("$(POD_NAME)", "nwbcache-0") for a in daemon["args"]]
    settings = load_settings(build_parser().parse_args(["serve", *args]), environ={})
    assert settings.host == "0.0.0.0" and settings.node_name == "nwbcache-0"
    assert {
        "name": "POD_NAME",
        "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}},
    } in daemon["env"]
    (port,) = daemon["ports"]
    assert port == {"name": "http", "containerPort": settings.port}
    assert headless["ports"][0]["targetPort"] == "http" and headless["ports"][0]["port"] == 8080
    for probe in ("readinessProbe", "livenessProbe"):
        assert daemon[probe]["httpGet"] == {"path": "/healthz", "port": "http"}
    # The cache is the pod's own volume, mounted where --cache-dir points.
    (claim,) = sts["volumeClaimTemplates"]
    mounts = {m["name"]: m["mountPath"] for m in daemon["volumeMounts"]}
    assert mounts[claim["metadata"]["name"]] == str(settings.cache_dir)
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    size = claim["spec"]["resources"]["requests"]["storage"]
    assert size.endswith("Ti") and settings.cache_size < int(size[:-2]) * 1024**4


def test_the_balancer_deployment_serves_the_configmap(
    manifests: dict[tuple[str, str], dict[str, Any]],
) -> None:
    deployment = manifests[("Deployment", "nwbcache-balancer")]["spec"]
    pod = deployment["template"]["spec"]
    (nginx,) = pod["containers"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mount = next(m for m in nginx["volumeMounts"] if m["mountPath"] == "/etc/nginx/conf.d")
    assert volumes[mount["name"]]["configMap"]["name"] == "nwbcache-balancer"
    assert nginx["ports"] == [{"name": "http", "containerPort": 8080}]
    assert nginx["readinessProbe"]["httpGet"]["path"] == "/healthz"
    service = manifests[("Service", "nwbcache-balancer")]["spec"]
    assert service["selector"].items() <= deployment["template"]["metadata"]["labels"].items()
    assert "listen 8080;" in NGINX_CONF.read_text()
