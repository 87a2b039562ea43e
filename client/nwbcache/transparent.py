"""Transparent mode: unmodified remfile and fsspec code reads through the daemon.

The ``nwbcache-transparent.pth`` file that the package installs at the top of
site-packages runs, at every interpreter start::

    import os; os.environ.get("NWBCACHE_URL") and <this module>.install()

so with NWBCACHE_URL unset the cost is one environment lookup and nothing is
imported. ``install()`` imports neither remfile nor fsspec, nor the client's
URL machinery: it asks :mod:`nwbcache.importhook` to patch each library right
after the user's code imports it (or at once, if it already has). Call
``install()`` yourself where no .pth runs (an embedded interpreter, or
NWBCACHE_URL set after start-up).

What is patched (:mod:`nwbcache.patches`), and why there:

- ``remfile.RemFile.__init__``: the URL (or the ``get_url()`` of a URL
  provider, asked before every request) is rewritten once per file.
- ``fsspec.implementations.http.HTTPFileSystem.encode_url``: every request of
  the HTTP filesystem, of its file objects and of the caching filesystems
  stacked on it (filecache, blockcache, simplecache) passes through it. The
  paths users see, and the caching filesystems' keys, stay upstream URLs.
- ``botocore.session.Session``: reads of the daemon's S3 buckets go to its S3
  endpoint (boto3, s3fs, the AWS CLI's library; :mod:`nwbcache.s3client`).
- ``s3fs.core.S3FileSystem._open``: a file read through the daemon gets
  4 MiB blocks in an LRU instead of s3fs's 50 MiB read-ahead, unless the
  user chose a block size or cache type.
  With ``NWBCACHE_S3_ENV=1``, ``AWS_ENDPOINT_URL_S3`` and friends are set for
  the whole process too (HDF5 2.x's ros3 reads them).

Only URLs whose host is on the allow-list (NWBCACHE_HOSTS, default the DANDI
bucket) are rewritten; writes (PUT/POST) never are, and a URL that already
points at the daemon is left as it is. The settings are read at each call,
so unsetting NWBCACHE_URL turns the patches off again.
"""

from __future__ import annotations

import os

from . import importhook

TYPE_CHECKING = False
if TYPE_CHECKING:
    from types import ModuleType

__all__ = ["TARGETS", "install"]


def _remfile(module: ModuleType) -> None:
    from .patches import patch_remfile

    patch_remfile(module)


def _fsspec_http(module: ModuleType) -> None:
    from .patches import patch_fsspec_http

    patch_fsspec_http(module)


def _botocore(module: ModuleType) -> None:
    from .s3client import patch_botocore

    patch_botocore(module)


def _s3fs(module: ModuleType) -> None:
    from .s3client import patch_s3fs

    patch_s3fs(module)


# remfile's package imports its RemFile module at once; fsspec imports its HTTP
# filesystem only when "http"/"https" is first used, so that is what is watched.
TARGETS = {
    "remfile.RemFile": _remfile,
    "fsspec.implementations.http": _fsspec_http,
    "botocore.session": _botocore,
    "s3fs.core": _s3fs,
}


def install() -> None:
    """Turn transparent mode on in this process (idempotent)."""
    importhook.watch(TARGETS)
    # NWBCACHE_S3_ENV (env.ENV_S3_ENV), read here rather than through env so
    # that start-up imports nothing more (see env.py).
    if os.environ.get("NWBCACHE_S3_ENV", "").strip().lower() in ("1", "true", "yes", "on"):
        from .s3client import set_environment  # the daemon is asked: only when told to

        set_environment()
