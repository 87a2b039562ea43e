"""The shipped balancer configs (deploy/cluster/) run for real in front of test daemons.

The shipped file is used as it is, except for what must differ on loopback:
its `server` lines (one per test daemon, keeping the shipped options) and its
listen address. Everything else (hashing, retries, health checks, timeouts)
is what a user copies.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
from collections.abc import Sequence
from pathlib import Path

import requests

from tests.support.helpers import REPO, find_tool, free_port, wait_until

CLUSTER = REPO / "deploy" / "cluster"
NGINX_CONF = CLUSTER / "nginx-balancer.conf"
HAPROXY_CONF = CLUSTER / "haproxy.cfg"

_NGINX_SERVER = re.compile(r"^(\s*)server\s+(\S+:\d+)(.*);\s*$", re.M)
_NGINX_LISTEN = re.compile(r"^(\s*)listen\s+8080;\s*$", re.M)
_HAPROXY_SERVER = re.compile(r"^(\s*)server\s+(\S+)\s+(\S+:\d+)(.*)$", re.M)
_HAPROXY_BIND = re.compile(r"^(\s*)bind\s+:8080\s*$", re.M)


def _replace_servers(text: str, pattern: re.Pattern[str], lines: list[str]) -> str:
    found = list(pattern.finditer(text))
    assert found, "no server lines in the shipped config"
    first, last = found[0], found[-1]
    between = text[first.start() : last.end()]
    assert len(between.splitlines()) == len(found), "server lines must be consecutive"
    return text[: first.start()] + "\n".join(lines) + text[last.end() :]


def render_nginx(text: str, nodes: Sequence[str], port: int) -> str:
    """The shipped nginx file with these nodes (host:port) and listening on ``port``."""
    shipped = _NGINX_SERVER.search(text)
    assert shipped is not None
    indent, options = shipped[1], shipped[3]
    text = _replace_servers(text, _NGINX_SERVER, [f"{indent}server {n}{options};" for n in nodes])
    text, count = _NGINX_LISTEN.subn(rf"\1listen 127.0.0.1:{port};", text)
    assert count == 1, "the shipped config must listen on 8080 once"
    return text


def render_haproxy(text: str, nodes: Sequence[str], port: int) -> str:
    """The shipped HAProxy file with these nodes (named n0, n1, ...) bound to ``port``."""
    shipped = _HAPROXY_SERVER.search(text)
    assert shipped is not None
    indent, options = shipped[1], shipped[4]
    lines = [f"{indent}server n{i} {n}{options}" for i, n in enumerate(nodes)]
    text = _replace_servers(text, _HAPROXY_SERVER, lines)
    text, count = _HAPROXY_BIND.subn(rf"\1bind 127.0.0.1:{port}", text)
    assert count == 1, "the shipped config must bind :8080 once"
    return text


class Balancer:
    """nginx or HAProxy as a child process, with a rendered shipped config."""

    def __init__(self, kind: str, work: Path, nodes: Sequence[str]) -> None:
        assert kind in ("nginx", "haproxy")
        self.kind = kind
        self.work = work
        self.nodes = list(nodes)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Balancer:
        self.work.mkdir(parents=True, exist_ok=True)
        if self.kind == "nginx":
            cmd = self._nginx_command()
        else:
            conf = self.work / "haproxy.cfg"
            conf.write_text(render_haproxy(HAPROXY_CONF.read_text(), self.nodes, self.port))
            cmd = [_tool("haproxy"), "-db", "-f", str(conf)]
        log = (self.work / "balancer.log").open("ab")
        self.proc = subprocess.Popen(
            cmd, stdout=log, stderr=log, start_new_session=True, cwd=self.work
        )
        log.close()
        wait_until(self._healthy, 15, f"{self.kind} answering /healthz")
        return self

    def _nginx_command(self) -> list[str]:
        prefix = self.work
        (prefix / "tmp").mkdir(exist_ok=True)
        (prefix / "balancer.conf").write_text(
            render_nginx(NGINX_CONF.read_text(), self.nodes, self.port)
        )
        temps = "\n".join(
            f"    {name}_temp_path {prefix}/tmp/{name};"
            for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        )
        (prefix / "nginx.conf").write_text(
            ("user root;\n" if os.geteuid() == 0 else "") + f"pid {prefix}/nginx.pid;\n"
            f"error_log {prefix}/error.log warn;\n"
            "daemon off;\n"
            "events { worker_connections 1024; }\n"
            "http {\n"
            f"    access_log {prefix}/access.log;\n"
            f"{temps}\n"
            f"    include {prefix}/balancer.conf;\n"
            "}\n"
        )
        return [_tool("nginx"), "-p", str(prefix), "-c", str(prefix / "nginx.conf")]

    def _healthy(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"{self.kind} exited: {(self.work / 'balancer.log').read_text()}")
        try:
            return requests.get(self.url + "/healthz", timeout=2).status_code == 200
        except requests.RequestException:
            return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)


def _tool(name: str) -> str:
    path = find_tool(name)
    assert path is not None, f"{name} not found: run scripts/install-test-deps.sh"
    return path
