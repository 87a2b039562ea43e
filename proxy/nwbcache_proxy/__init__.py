"""nwbcache_proxy: the caching range-proxy daemon of nwbcache."""

from nwbcache import __version__

__all__ = ["__version__"]
