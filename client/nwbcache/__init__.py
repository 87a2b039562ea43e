"""nwbcache: stream NWB files from S3 through a shared, lab-wide block cache.

This package is the light client side: importing it pulls in neither
aiohttp nor remfile nor fsspec. The daemon is the ``nwbcache_proxy`` package.
"""

from __future__ import annotations

__version__ = "0.1.0"

from .urls import original_url, proxied_url

__all__ = ["__version__", "original_url", "proxied_url"]
