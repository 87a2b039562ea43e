"""nwbcache: stream NWB files from S3 through a shared, lab-wide block cache.

This package is the light client side: importing it pulls in neither
aiohttp nor remfile nor fsspec nor requests (each is imported by the function
that uses it). The daemon is the ``nwbcache_proxy`` package.

- :func:`proxied_url` / :func:`original_url`: URL mapping, both ways.
- :func:`open`: a file object for ``h5py.File`` that reads through the daemon.
- :func:`dandi_url`: the proxied URL of a DANDI asset.
- :mod:`nwbcache.transparent`: unmodified remfile/fsspec code goes through
  the daemon when NWBCACHE_URL is set.

The names are loaded on first use (PEP 562): the transparent-mode hook
imports this package in every interpreter start while NWBCACHE_URL is set,
and must not pay for URL parsing there.
"""

from __future__ import annotations

__version__ = "0.1.0"

TYPE_CHECKING = False
if TYPE_CHECKING:
    from .dandi_assets import dandi_url
    from .reading import NotCached, open
    from .routing import DaemonUnavailable, FallbackWarning
    from .urls import original_url, proxied_url

__all__ = [
    "DaemonUnavailable",
    "FallbackWarning",
    "NotCached",
    "__version__",
    "dandi_url",
    "open",
    "original_url",
    "proxied_url",
]

_HOMES = {
    "DaemonUnavailable": "routing",
    "FallbackWarning": "routing",
    "NotCached": "reading",
    "dandi_url": "dandi_assets",
    "open": "reading",
    "original_url": "urls",
    "proxied_url": "urls",
}


def __getattr__(name: str) -> object:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'nwbcache' has no attribute {name!r}")
    from importlib import import_module

    value = getattr(import_module(f"{__name__}.{home}"), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
