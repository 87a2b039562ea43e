"""The ``nwbcache`` command.

``nwbcache serve`` runs the daemon; ``nwbcache url`` prints the proxied URL
of an S3 object or a DANDI asset; ``nwbcache run -- CMD`` runs a command in
transparent mode, and ``nwbcache env`` prints the variables that turn it on;
``pin``, ``unpin``, ``evict``, ``ls`` (admincli.py), ``warm`` and ``jobs``
(warmcli.py) use the daemon's admin API.
The daemon's modules are imported only by ``serve``, so the other commands
stay as light as the client library.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections.abc import Sequence

from . import __version__, admincli, env, warmcli
from .urls import DANDI_API_URL, InvalidURL, _proxy, proxied_url


def build_parser() -> argparse.ArgumentParser:
    from nwbcache_proxy.flags import add_serve_arguments  # stdlib-only module

    parser = argparse.ArgumentParser(
        prog="nwbcache",
        description=(
            "A shared, on-disk block cache for NWB/HDF5 files streamed from S3 "
            "(the DANDI Archive and other stores)."
        ),
    )
    parser.add_argument("--version", action="version", version=f"nwbcache {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    serve = sub.add_parser(
        "serve",
        help="run the caching daemon",
        description=(
            "Run the caching daemon. Clients read "
            "http://HOST:PORT/<scheme>/<host>/<path> and get the bytes of "
            "<scheme>://<host>/<path>, from the cache when it has them. Every "
            "flag can also be set as NWBCACHE_<FLAG> in the environment (e.g. "
            "NWBCACHE_CACHE_SIZE=50G) or in a TOML file given with --config."
        ),
        epilog=(
            "Example: nwbcache serve --cache-dir /data/nwbcache --cache-size 500G "
            "--allow-upstream dandiarchive.s3.amazonaws.com"
        ),
    )
    add_serve_arguments(serve)

    url = sub.add_parser(
        "url",
        help="print the proxied URL of an S3 URL or a DANDI asset",
        description=(
            f"Print the URL to read URL through the daemon at --proxy (default ${env.ENV_URL}). "
            "With --dandi DANDISET, the positional argument is an asset path, looked up "
            "with the DANDI API."
        ),
        epilog=(
            "Examples: nwbcache url s3://dandiarchive/blobs/abc/def/<uuid>; "
            "nwbcache url --dandi 000006 sub-anm369962/sub-anm369962_ses-20170310.nwb"
        ),
    )
    url.add_argument(
        "url", metavar="URL", help="https://..., http://... or s3://bucket/key (PATH with --dandi)"
    )
    url.add_argument("--proxy", help=f"the daemon's base URL, e.g. {env.DEFAULT_DAEMON_URL}")
    url.add_argument("--dandi", metavar="DANDISET", help="a Dandiset id, e.g. 000006")
    url.add_argument("--version", default="draft", help="the Dandiset version (default draft)")
    url.add_argument(
        "--api-url",
        help=f"the DANDI API (default {DANDI_API_URL}, or dandi's $DANDI_INSTANCE)",
    )

    run = sub.add_parser(
        "run",
        help="run a command whose remfile/fsspec reads go through the daemon",
        description=(
            f"Run CMD with {env.ENV_URL} set (from --proxy or the environment), so that "
            "remfile and fsspec in every Python process it starts read allowed "
            f"upstreams ({env.ENV_HOSTS}, default the DANDI bucket) through the daemon. "
            "Python processes need nwbcache installed in their environment."
        ),
        epilog=f"Example: nwbcache run --proxy {env.DEFAULT_DAEMON_URL} -- python analysis.py",
    )
    run.add_argument("--proxy", help=f"the daemon's base URL (default ${env.ENV_URL})")
    run.add_argument(
        "--s3",
        action="store_true",
        help="also point every S3 client (boto3, s3fs, the AWS CLI, HDF5 2.x ros3) at the "
        "daemon's S3 endpoint: AWS_ENDPOINT_URL_S3 and friends, for every bucket",
    )
    run.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD ...")

    env_cmd = sub.add_parser(
        "env",
        help="print the shell lines that send a session's reads through the daemon",
        description=(
            f"Print export lines for a shell, a JupyterHub spawner or a job script: "
            f"{env.ENV_URL}, and with --s3 the variables that point every S3 client at the "
            "daemon's S3 endpoint (asked of the daemon)."
        ),
        epilog='Example: eval "$(nwbcache env --s3 --proxy http://labcache:8080)"',
    )
    env_cmd.add_argument("--proxy", help=f"the daemon's base URL (default ${env.ENV_URL})")
    env_cmd.add_argument("--s3", action="store_true", help="the S3 clients' variables too")

    status = sub.add_parser(
        "status",
        help="print a running daemon's figures (cache fill, hit ratios, upstream, top objects)",
        description=(
            "Print what the daemon's status page (GET /) shows: the cache's fill, hit "
            "ratios and traffic over the last minute and hour, and the objects taking "
            f"most of the cache. The daemon is --url, else ${env.ENV_URL}, else "
            f"{env.DEFAULT_DAEMON_URL}."
        ),
    )
    check = sub.add_parser(
        "check",
        help="verify the cached blocks (header, checksum, version) and the index",
        description=(
            "Verify the cache's blocks against their object's version and checksum, and "
            "compare the index with the files, one directory at a time (memory does not "
            "grow with the cache; a progress bar on a terminal). With --repair, delete "
            "corrupt blocks and reconcile the index. Safe while daemons are running. "
            "Ctrl-C saves where it was, and --resume goes on from there. Exit status: 0 "
            "clean or repaired, 1 problems found and not repaired, 2 usage errors, 130 "
            "interrupted."
        ),
        epilog=(
            "Examples: nwbcache check --sample 0.01; nwbcache check --repair --prefix "
            "s3://dandiarchive/blobs/; nwbcache check --object s3://dandiarchive/blobs/abc/def/<uuid>"
        ),
    )
    check.add_argument(
        "--cache-dir", help=f"the cache (default ${env.ENV_CACHE_DIR}, else serve's default)"
    )
    check.add_argument("--repair", action="store_true", help="delete corrupt blocks, fix the index")
    check.add_argument(
        "--sample",
        type=float,
        default=1.0,
        metavar="FRACTION",
        help="read and verify only this random fraction of the blocks, 0 < FRACTION <= 1 "
        "(every block is still listed and compared with the index)",
    )
    check.add_argument(
        "--seed", type=int, help="the seed of --sample's choice (default random, printed)"
    )
    which = check.add_mutually_exclusive_group()
    which.add_argument(
        "--prefix",
        metavar="URL_PREFIX",
        help="only objects whose URL starts with URL_PREFIX, compared as cache keys are: "
        "scheme and host lowercased, default port dropped, s3://bucket/ as "
        "https://bucket.s3.amazonaws.com/, signature parameters dropped (a prefix that "
        "ends with the host means that whole host). Reads every meta.json",
    )
    which.add_argument(
        "--object", metavar="URL", help="only this object (straight to its directory, no walk)"
    )
    check.add_argument(
        "--resume", action="store_true", help="go on with an interrupted check (same options)"
    )
    check.add_argument("--json", action="store_true", help="print the report as JSON")

    status.add_argument("--url", help="the daemon's base URL")
    status.add_argument("--json", action="store_true", help="print the raw JSON report")
    admincli.add_commands(sub)
    warmcli.add_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "serve":
        return _serve(parser, args)
    if args.command == "url":
        return _url(parser, args)
    if args.command == "run":
        return _run(parser, args)
    if args.command == "status":
        return _status(parser, args)
    if args.command == "env":
        return _env(parser, args)
    if args.command == "check":
        return _check(args)
    if args.command in admincli.COMMANDS:
        return admincli.run(args)
    if args.command in warmcli.COMMANDS:
        return admincli.run(args, warmcli.run)
    parser.error(f"unknown command {args.command}")


def _url(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    try:
        if args.dandi is None:
            print(proxied_url(args.url, args.proxy))
            return 0
        from .dandi_assets import dandi_url

        print(dandi_url(args.dandi, args.url, args.version, args.api_url, args.proxy))
    except InvalidURL as exc:
        parser.exit(2, f"nwbcache url: {exc}\n")
    except Exception as exc:  # the DANDI client's errors: not found, HTTP, connection
        parser.exit(1, f"nwbcache url: {type(exc).__name__}: {exc}\n")
    return 0


def _daemon(parser: argparse.ArgumentParser, args: argparse.Namespace) -> str:
    """The daemon's base URL from --proxy or NWBCACHE_URL, validated and normalised."""
    proxy = args.proxy if args.proxy is not None else env.proxy() or ""
    if not proxy.strip():
        parser.exit(
            2, f"nwbcache {args.command}: no daemon given: pass --proxy URL or set {env.ENV_URL}\n"
        )
    try:
        return _proxy(proxy).base  # "host:8080/" -> http://host:8080
    except InvalidURL as exc:
        parser.exit(2, f"nwbcache {args.command}: {exc}\n")


def _s3_environment(parser: argparse.ArgumentParser, command: str, base: str) -> dict[str, str]:
    """The S3 clients' variables for the daemon at ``base``; exits when it has no endpoint."""
    from .s3client import environment, find_endpoint

    try:
        endpoint = find_endpoint(base)
    except (OSError, ValueError) as exc:
        parser.exit(1, f"nwbcache {command}: cannot ask {base}/healthz: {exc}\n")
    if endpoint is None:
        parser.exit(
            1, f"nwbcache {command}: the daemon at {base} has no S3 endpoint (--s3-listen)\n"
        )
    return environment(endpoint)


def _env(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    import shlex

    base = _daemon(parser, args)
    lines = {env.ENV_URL: base}
    if args.s3:
        lines.update(_s3_environment(parser, "env", base))
    for name, value in lines.items():
        print(f"export {name}={shlex.quote(value)}")
    return 0


def _run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        parser.exit(2, "nwbcache run: no command given (nwbcache run -- CMD ...)\n")
    base = _daemon(parser, args)
    environ = env.environ_with_proxy(base)
    if args.s3:
        environ.update(_s3_environment(parser, "run", base))
    if os.name == "posix":
        # Become the command: its exit status, signals and terminal are its own.
        try:
            os.execvpe(cmd[0], cmd, environ)
        except OSError as exc:
            parser.exit(127, f"nwbcache run: cannot run {cmd[0]!r}: {exc}\n")
    try:
        return subprocess.call(cmd, env=environ)
    except OSError as exc:
        parser.exit(127, f"nwbcache run: cannot run {cmd[0]!r}: {exc}\n")


def _status(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    import json
    import urllib.error
    import urllib.request

    base = (args.url or env.proxy() or env.DEFAULT_DAEMON_URL).rstrip("/")
    # No proxies: the daemon is on this machine or the lab network.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(f"{base}/status.json", timeout=10) as resp:
            report = json.loads(resp.read())
    except (urllib.error.URLError, OSError, ValueError) as exc:
        parser.exit(1, f"nwbcache status: cannot read {base}/status.json: {exc}\n")
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    from nwbcache_proxy.status import render_text

    sys.stdout.write(render_text(report))
    return 0


def _check(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from nwbcache_proxy.check import CheckError, CheckOptions, check_cache, url_key
    from nwbcache_proxy.config import default_cache_dir

    cache_dir = Path(args.cache_dir or env.cache_dir() or default_cache_dir())
    try:
        options = CheckOptions(
            repair=args.repair,
            sample=args.sample,
            seed=args.seed,
            prefix=None if args.prefix is None else url_key(args.prefix, prefix=True),
            key=None if args.object is None else url_key(args.object),
        )
        report = check_cache(cache_dir, options, resume=args.resume, progress=sys.stderr.isatty())
    except CheckError as exc:
        print(f"nwbcache check: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # before the walk began: nothing to resume
        return 130
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        print(f"nwbcache check {cache_dir}")
        print(report.summary())
    if report.interrupted:
        print(
            "nwbcache check: interrupted; to go on from where it stopped, run the same "
            "command with --resume",
            file=sys.stderr,
        )
        return 130
    return 0 if report.ok or args.repair else 1


def _serve(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from nwbcache_proxy.flags import load_settings

    try:
        settings = load_settings(args)
    except ValueError as exc:
        parser.exit(2, f"nwbcache serve: {exc}\n")
    from nwbcache_proxy.runner import run

    return run(settings)


if __name__ == "__main__":
    sys.exit(main())
