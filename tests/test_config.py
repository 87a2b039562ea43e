"""Settings from flags, NWBCACHE_* environment and TOML, and the CLI's help."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from bench.harness import process_tree
from nwbcache.cli import build_parser
from nwbcache.urls import DANDI_HOSTS
from nwbcache_proxy.buffers import Budget
from nwbcache_proxy.config import DEFAULT_BLOCK_SIZE, Settings
from nwbcache_proxy.cpus import cgroup_cpu_quota, cgroup_v2_dirs, parse_workers, usable_cpus
from nwbcache_proxy.flags import load_settings
from nwbcache_proxy.policy import Eviction
from nwbcache_proxy.runner import new_loop
from tests.support.daemons import DaemonProcess
from tests.support.helpers import scrape, value, wait_until


def _args(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["serve", *argv])


def test_defaults_bind_loopback_and_allow_only_dandi(tmp_path: Path) -> None:
    s = load_settings(_args(), environ={"XDG_CACHE_HOME": str(tmp_path)})
    assert s.host == "127.0.0.1"
    assert s.port == 8080
    assert s.allow_upstream == DANDI_HOSTS
    assert s.block_size == DEFAULT_BLOCK_SIZE
    assert s.cache_dir == tmp_path / "nwbcache"


def test_flags_parse_sizes_and_repeat_allow_upstream() -> None:
    s = load_settings(
        _args(
            "--cache-size",
            "500M",
            "--block-size",
            "4M",
            "--allow-upstream",
            "a.example:9000",
            "--allow-upstream",
            "b.example",
        ),
        environ={},
    )
    assert s.cache_size == 500 * 1024**2
    assert s.block_size == 4 * 1024**2
    assert s.allow_upstream == ("a.example:9000", "b.example")


def test_precedence_flag_over_env_over_file_over_default(tmp_path: Path) -> None:
    config = tmp_path / "nwbcache.toml"
    config.write_text('cache-size = "1G"\nblock-size = "128K"\nport = 9001\nworkers = 3\n')
    env = {"NWBCACHE_CONFIG": str(config), "NWBCACHE_BLOCK_SIZE": "64K", "NWBCACHE_PORT": "9002"}
    s = load_settings(_args("--port", "9003"), environ=env)
    assert s.port == 9003  # flag
    assert s.block_size == 64 * 1024  # env over file
    assert s.cache_size == 1024**3  # file over default
    assert s.workers == 3


def test_env_allow_upstream_is_a_list() -> None:
    s = load_settings(_args(), environ={"NWBCACHE_ALLOW_UPSTREAM": "a.example, b.example:81"})
    assert s.allow_upstream == ("a.example", "b.example:81")


def test_config_file_with_serve_table_and_list(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text('[serve]\nallow_upstream = ["x.example", "y.example:8443"]\nfsync = true\n')
    s = load_settings(_args("--config", str(config)), environ={})
    assert s.allow_upstream == ("x.example", "y.example:8443")
    assert s.fsync is True


@pytest.mark.parametrize(
    ("line", "field", "got"),
    [
        ("buffer_memory = 1.5e9", "buffer_memory", 1_500_000_000),  # a size, in bytes
        ("cache_size = 1073741824", "cache_size", 1024**3),
        ("pin_limit = 5e3", "pin_limit", 5000),
        ("cache_size = 1e13", "cache_size", 10**13),  # (str(1e16) would be "1e+16")
        ("port = 9001", "port", 9001),
        ("revalidate_after = 60", "revalidate_after", 60.0),
        ("retry_base_delay = 0.2", "retry_base_delay", 0.2),
        ('trace = "t.jsonl"', "trace", Path("t.jsonl")),
        ("workers = 3", "workers", 3),
        ("fsync = false", "fsync", False),
    ],
)
def test_toml_numbers_and_booleans_get_the_settings_types(
    tmp_path: Path, line: str, field: str, got: object
) -> None:
    config = tmp_path / "c.toml"
    config.write_text(line + "\n")
    value = getattr(load_settings(_args("--config", str(config)), environ={}), field)
    assert value == got and type(value) is type(got)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("port = true", "expected text or a number: True"),
        ("cache_size = true", "expected text or a number: True"),
        ("trace = false", "expected text or a number: False"),  # not a file named False
        ("fsync = 1", "expected true or false: 1"),
        ("workers = 2.5", "--workers takes a number or auto, got '2.5'"),
        ('host = ["0.0.0.0"]', "expected text or a number: ['0.0.0.0']"),
        ("allow_upstream = 5", "expected a list of strings, got 5"),
        ("allow_upstream = [5]", "expected a list of strings, got [5]"),
    ],
)
def test_toml_values_of_the_wrong_kind_are_refused(tmp_path: Path, line: str, message: str) -> None:
    config = tmp_path / "c.toml"
    config.write_text(line + "\n")
    with pytest.raises(ValueError) as info:
        load_settings(_args("--config", str(config)), environ={})
    assert str(info.value) == f"{config}: {line.split()[0]}: {message}"


def test_a_flag_of_auto_or_nothing_overrides_the_file_and_the_environment(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text('buffer_memory = "2G"\npin_limit = "1G"\n')
    args = _args("--config", str(config), "--buffer-memory", "auto", "--pin-limit", "")
    s = load_settings(args, environ={"NWBCACHE_BUFFER_MEMORY": "512M"})
    assert s.buffer_memory is None and s.pin_limit is None
    unset = load_settings(_args("--config", str(config)), environ={})  # and unset, they don't
    assert unset.buffer_memory == 2 * 1024**3 and unset.pin_limit == 1024**3


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        (["--block-size", "3"], {}, "block-size"),
        (["--cache-size", "1K", "--block-size", "1K"], {}, "too small"),
        ([], {"NWBCACHE_CACHE_SIZE": "lots"}, "NWBCACHE_CACHE_SIZE"),
        ([], {"NWBCACHE_FSYNC": "maybe"}, "NWBCACHE_FSYNC"),
        (["--workers", "0"], {}, "workers"),
        ([], {"NWBCACHE_WORKERS": "many"}, "NWBCACHE_WORKERS: --workers takes a number or auto"),
        (["--allow-upstream", "bad host!"], {}, "allow-list entry"),
        ([], {"NWBCACHE_EVICTION": "arc"}, "must be one of s3fifo, lru, got .arc."),
        ([], {"NWBCACHE_EVICTION": "random"}, "^NWBCACHE_EVICTION"),
        (["--event-loop", "trio"], {}, "--event-loop must be auto, uvloop or asyncio"),
        ([], {"NWBCACHE_BUFFER_MEMORY": "lots"}, "^NWBCACHE_BUFFER_MEMORY"),
        (["--workers", "4", "--buffer-memory", "32M"], {}, "gives each of 4 workers 8 MiB"),
        (
            ["--buffer-memory", "1500K"],
            {},
            r"^--buffer-memory 1.46 MiB is too little: give at least 16 MiB$",
        ),
    ],
)
def test_bad_settings_fail_with_a_clear_message(
    argv: list[str], env: dict[str, str], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        load_settings(_args(*argv), environ=env)


@pytest.mark.parametrize(
    ("argv", "env", "kind"),
    [
        ([], {}, "uvloop"),  # auto: uvloop, a dependency of the daemon here
        (["--event-loop", "asyncio"], {}, "asyncio"),
        ([], {"NWBCACHE_EVENT_LOOP": "asyncio"}, "asyncio"),
        (["--event-loop", "uvloop"], {"NWBCACHE_EVENT_LOOP": "asyncio"}, "uvloop"),
    ],
)
def test_the_event_loop_is_uvloops_unless_asked(
    argv: list[str], env: dict[str, str], kind: str
) -> None:
    loop = new_loop(load_settings(_args(*argv), environ=env).event_loop)
    try:
        assert type(loop).__module__.partition(".")[0] == kind
        assert loop.run_until_complete(asyncio.sleep(0, "ran")) == "ran"
    finally:
        loop.close()


@pytest.mark.parametrize(
    ("argv", "env", "eviction"),
    [
        ([], {}, Eviction.S3FIFO),
        (["--eviction", "LRU"], {}, Eviction.LRU),
        ([], {"NWBCACHE_EVICTION": "lru"}, Eviction.LRU),
        (["--eviction", "s3fifo"], {"NWBCACHE_EVICTION": "lru"}, Eviction.S3FIFO),
    ],
)
def test_eviction_policy(argv: list[str], env: dict[str, str], eviction: Eviction) -> None:
    assert load_settings(_args(*argv), environ=env).eviction is eviction


def test_unknown_config_key_is_named(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text("cache_sise = '1G'\n")
    with pytest.raises(ValueError, match="cache_sise"):
        load_settings(_args("--config", str(config)), environ={})


@pytest.mark.slow
def test_bad_size_flag_is_a_usage_error() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "nwbcache_proxy", "serve", "--cache-size", "20X"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "--cache-size" in proc.stderr


@pytest.mark.slow
def test_serve_help_explains_every_flag() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "nwbcache_proxy", "serve", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0
    for flag in (
        "--host",
        "--port",
        "--cache-dir",
        "--cache-size",
        "--block-size",
        "--allow-upstream",
        "--workers",
        "NWBCACHE_",
        "--config",
    ):
        assert flag in proc.stdout


def test_settings_validate_rejects_port_out_of_range() -> None:
    with pytest.raises(ValueError, match="port"):
        Settings(port=70000).validate()


@pytest.mark.slow
def test_url_command_prints_proxied_url() -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "nwbcache_proxy",
            "url",
            "--proxy",
            "http://127.0.0.1:8080",
            "s3://dandiarchive/blobs/abc/def/0123",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == (
        "http://127.0.0.1:8080/https/dandiarchive.s3.amazonaws.com/blobs/abc/def/0123"
    )


@pytest.mark.parametrize(
    ("text", "cpus", "workers"),
    [("auto", 8, 8), ("AUTO", 2, 2), (" auto ", 1, 1), ("auto", 0, 1), ("3", 8, 3)],
)
def test_workers_auto_is_one_per_usable_cpu(text: str, cpus: int, workers: int) -> None:
    assert parse_workers(text, lambda: cpus) == workers


def test_buffer_memory_from_flag_env_and_file_is_shared_by_the_workers(tmp_path: Path) -> None:
    mib = 1024 * 1024
    default = load_settings(_args(), environ={})
    assert default.buffer_memory is None and default.buffer_budget.total == 160 * mib
    flag = load_settings(_args("--workers", "4", "--buffer-memory", "256M"), environ={})
    assert flag.buffer_budget == Budget(40_265_318, 13_421_772, 13_421_774)  # 64 MiB each
    env = load_settings(_args("--workers", "8"), environ={"NWBCACHE_BUFFER_MEMORY": "auto"})
    assert env.buffer_memory is None and env.buffer_budget.total == 128 * mib  # 1 GiB / 8
    config = tmp_path / "nwbcache.toml"
    config.write_text('buffer-memory = "2G"\nworkers = 2\n')
    from_file = load_settings(_args("--config", str(config)), environ={})
    assert from_file.buffer_memory == 2048 * mib and from_file.buffer_budget.total == 1024 * mib


def test_workers_auto_from_flag_env_and_file(tmp_path: Path) -> None:
    cpus = usable_cpus()
    assert load_settings(_args("--workers", "auto"), environ={}).workers == cpus
    assert load_settings(_args(), environ={"NWBCACHE_WORKERS": "auto"}).workers == cpus
    config = tmp_path / "nwbcache.toml"
    config.write_text('workers = "auto"\n')
    assert load_settings(_args("--config", str(config)), environ={}).workers == cpus
    assert 1 <= cpus <= len(os.sched_getaffinity(0))


@pytest.mark.parametrize(
    ("text", "cpus"),
    [
        ("max 100000\n", None),  # v2, no limit
        ("200000 100000\n", 2),  # --cpus 2
        ("250000 100000", 3),  # --cpus 2.5: rounded up
        ("50000 100000", 1),
        ("-1 100000", None),  # v1, no limit
        (" ", None),  # not readable
        ("", None),
        ("x 100000", None),
        ("100000 0", None),
    ],
)
def test_cgroup_cpu_quota(text: str, cpus: int | None) -> None:
    assert cgroup_cpu_quota(text) == cpus


@pytest.mark.parametrize(
    ("proc_cgroup", "dirs"),
    [
        ("0::/\n", [""]),  # a container with its own cgroup namespace
        (
            "0::/system.slice/nwbcache.service\n",
            ["system.slice/nwbcache.service", "system.slice", ""],
        ),
        (
            "12:cpu,cpuacct:/docker/abc\n0::/user.slice/x.scope\n",
            ["user.slice/x.scope", "user.slice", ""],
        ),
        ("12:cpu,cpuacct:/docker/abc\n", []),  # cgroup v1 only
        ("0::/a/../b\n", ["a/b", "a", ""]),  # nothing climbs out of the mount
        ("", []),
    ],
)
def test_cgroup_v2_dirs_are_the_process_cgroup_and_those_above(
    proc_cgroup: str, dirs: list[str]
) -> None:
    assert cgroup_v2_dirs(proc_cgroup) == dirs


def _serve(*argv: str, environ: dict[str, str] | None = None) -> Settings:
    return load_settings(build_parser().parse_args(["serve", *argv]), environ=environ or {})


def test_the_s3_endpoint_listens_on_loopback_8081_with_dandis_bucket() -> None:
    settings = _serve()
    assert settings.s3_address == ("127.0.0.1", 8081)
    [bucket] = settings.s3_buckets
    assert (bucket.name, bucket.base) == ("dandiarchive", "https://dandiarchive.s3.amazonaws.com")


@pytest.mark.parametrize(
    ("argv", "environ", "address"),
    [
        (["--s3-listen", "off"], {}, None),
        (["--s3-listen", ""], {}, None),
        ([], {"NWBCACHE_S3_LISTEN": "off"}, None),
        ([], {"NWBCACHE_S3_LISTEN": "0.0.0.0:9000"}, ("0.0.0.0", 9000)),
        (["--s3-listen", "[::1]:0"], {}, ("::1", 0)),
    ],
)
def test_s3_listen(argv: list[str], environ: dict[str, str], address: object) -> None:
    assert _serve(*argv, environ=environ).s3_address == address


@pytest.mark.parametrize("value", ["8081", "host:", ":80", "h:99999", "h:port"])
def test_a_bad_s3_listen_is_refused(value: str) -> None:
    with pytest.raises(ValueError, match="--s3-listen"):
        _serve("--s3-listen", value)


def test_s3_buckets_must_be_allowed_and_named_once() -> None:
    given = _serve(
        "--allow-upstream",
        "127.0.0.1:9000/b",
        "--s3-bucket",
        "one=http://127.0.0.1:9000/b",
        "--s3-bucket",
        "two=http://127.0.0.1:9000/b/two",
    )
    assert [b.name for b in given.s3_buckets] == ["one", "two"]
    with pytest.raises(ValueError, match="not on --allow-upstream"):
        _serve("--s3-bucket", "evil=http://127.0.0.1:9000/b")
    with pytest.raises(ValueError, match="given twice"):
        _serve(
            "--allow-upstream",
            "h",
            "--s3-bucket",
            "one=http://h/a",
            "--s3-bucket",
            "one=http://h/b",
        )


def test_the_default_bucket_is_left_out_when_its_host_is_not_allowed() -> None:
    """A daemon for another store serves no DANDI bucket (and starts)."""
    assert _serve("--allow-upstream", "127.0.0.1:9000").s3_buckets == ()


def test_s3_buckets_from_a_config_file(tmp_path: Path) -> None:
    config = tmp_path / "nwbcache.toml"
    config.write_text(
        '[serve]\nallow_upstream = ["minio.lab:9000"]\n'
        's3_listen = "0.0.0.0:8081"\n'
        's3_bucket = ["raw=http://minio.lab:9000/raw", "derived=http://minio.lab:9000/derived"]\n'
    )
    settings = _serve("--config", str(config))
    assert settings.s3_address == ("0.0.0.0", 8081)
    assert [b.base for b in settings.s3_buckets] == [
        "http://minio.lab:9000/raw",
        "http://minio.lab:9000/derived",
    ]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("extra", "kind"), [([], "uvloop"), (["--event-loop", "asyncio"], "asyncio")]
)
def test_each_worker_process_says_which_event_loop_it_runs_on(
    tmp_path: Path, extra: list[str], kind: str
) -> None:
    log = tmp_path / "daemon.log"
    daemon = DaemonProcess(
        ["--cache-dir", str(tmp_path / "cache"), "--workers", "2", *extra], stderr_path=log
    ).start()

    def said() -> list[str]:
        return [line for line in log.read_text().splitlines() if "; event loop " in line]

    try:
        assert requests.get(f"{daemon.url}/healthz", timeout=10).status_code == 200
        # Each worker logs once it serves; the first to serve let start() return.
        assert wait_until(lambda: len(said()) == 2, 20), said()
    finally:
        assert daemon.terminate() == 0
    lines = said()
    assert len(lines) == 2 and all(line.endswith(f"; event loop {kind}") for line in lines), lines


@pytest.mark.slow
def test_each_worker_says_its_share_and_too_small_a_one_stops_the_start(tmp_path: Path) -> None:
    """Two worker processes, 100M between them: each says it keeps 50 MiB, and
    /metrics sums them to 100M, also once a worker killed has been replaced;
    four workers cannot share 32M, and the daemon says so before starting.
    (That a share reaches the cache: test_buffers.py.)"""
    log = tmp_path / "daemon.log"
    daemon = DaemonProcess(
        ["--cache-dir", str(tmp_path / "cache"), "--workers", "2", "--buffer-memory", "100M"],
        stderr_path=log,
    ).start()

    def said() -> list[str]:
        return [line for line in log.read_text().splitlines() if "; event loop " in line]

    def budget() -> float:
        return value(scrape(daemon.url), "nwbcache_buffer_memory_bytes")

    try:
        assert wait_until(lambda: len(said()) == 2, 20), said()
        assert budget() == 100 * 1024 * 1024
        assert daemon.proc is not None
        workers = process_tree(daemon.proc.pid)[1:]
        assert len(workers) == 2
        os.kill(workers[0], signal.SIGKILL)
        assert wait_until(lambda: len(said()) == 3, 20), said()  # its replacement
        assert wait_until(lambda: budget() == 100 * 1024 * 1024, 10), budget()
    finally:
        assert daemon.terminate() == 0
    assert all(", buffers 50 MiB per worker, " in line for line in said()), said()
    proc = subprocess.run(
        [sys.executable, "-m", "nwbcache_proxy", "serve", "--workers", "4"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "NWBCACHE_BUFFER_MEMORY": "32M"},
    )
    assert proc.returncode == 2
    assert (
        "--buffer-memory 32 MiB gives each of 4 workers 8 MiB; give at least 16 MiB per "
        "worker (64 MiB in all), or fewer --workers"
    ) in proc.stderr
