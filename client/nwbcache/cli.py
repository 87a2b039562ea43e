"""The ``nwbcache`` command.

``nwbcache serve`` runs the daemon; ``nwbcache url`` prints the proxied URL
of an S3 object. The daemon's modules are imported only by ``serve``, so the
other commands stay as light as the client library.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from . import __version__
from .urls import InvalidURL, proxied_url


def build_parser() -> argparse.ArgumentParser:
    from nwbcache_proxy.config import add_serve_arguments  # stdlib-only module

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
        help="print the proxied URL of an S3 URL",
        description=(
            "Print the URL to read URL through the daemon at --proxy (default $NWBCACHE_URL)."
        ),
    )
    url.add_argument("url", metavar="URL", help="https://..., http://... or s3://bucket/key")
    url.add_argument("--proxy", help="the daemon's base URL, e.g. http://127.0.0.1:8080")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "serve":
        return _serve(parser, args)
    if args.command == "url":
        try:
            print(proxied_url(args.url, args.proxy))
        except InvalidURL as exc:
            parser.exit(2, f"nwbcache url: {exc}\n")
        return 0
    parser.error(f"unknown command {args.command}")


def _serve(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from nwbcache_proxy.config import load_settings

    try:
        settings = load_settings(args)
    except ValueError as exc:
        parser.exit(2, f"nwbcache serve: {exc}\n")
    from nwbcache_proxy.app import run

    return run(settings)


if __name__ == "__main__":
    sys.exit(main())
