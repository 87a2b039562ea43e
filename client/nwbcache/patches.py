"""The patches of transparent mode (see :mod:`nwbcache.transparent`).

Imported only when remfile or fsspec's HTTP filesystem is, so an interpreter
start with NWBCACHE_URL set does not pay for URL parsing and routing.
"""

from __future__ import annotations

import contextvars
import dataclasses
import functools
import threading
import warnings
from collections.abc import Awaitable, Callable
from types import ModuleType
from typing import Any

from . import env
from .routing import choose
from .urls import DANDI_HOSTS, AllowList, InvalidURL, _proxy, parse_upstream_url, proxied_url

__all__ = ["patch_fsspec_http", "patch_remfile", "rewrite"]

_PATCHED = "__nwbcache_patched__"

# Set while fsspec writes: a PUT/POST must reach upstream, the daemon only reads.
_writing: contextvars.ContextVar[bool] = contextvars.ContextVar("nwbcache_writing", default=False)

_warn_lock = threading.Lock()
_config_warned: set[str] = set()


def _warn_config_once(message: str) -> None:
    with _warn_lock:
        if message in _config_warned:
            return
        _config_warned.add(message)
    warnings.warn(message, RuntimeWarning, stacklevel=3)


@dataclasses.dataclass(frozen=True, slots=True)
class ClientSettings:
    proxy: str | None  # NWBCACHE_URL as given, None when unset or blank
    hosts: AllowList  # parsed NWBCACHE_HOSTS, DANDI_HOSTS by default


def current() -> ClientSettings:
    """Where transparent mode sends what. Raises InvalidURL for a malformed NWBCACHE_HOSTS."""
    return _settings(env.proxy(), env.hosts())


@functools.lru_cache(maxsize=16)
def _settings(proxy: str | None, hosts: str | None) -> ClientSettings:
    """Parsed once per distinct set of values: fsspec asks on every request."""
    entries = DANDI_HOSTS if hosts is None else env.split_entries(hosts)
    return ClientSettings(proxy=proxy, hosts=AllowList.parse(entries))


@functools.lru_cache(maxsize=1024)
def _plan(url: str, settings: ClientSettings) -> tuple[str, str] | None:
    """(through the daemon, upstream) for ``url``, or None to leave it as it is.

    Pure, hence cached: fsspec asks for every request, and parsing costs
    more than a cached block takes to serve. InvalidURL: a bad NWBCACHE_URL.
    """
    assert settings.proxy is not None
    daemon = _proxy(settings.proxy)
    try:
        upstream = parse_upstream_url(url)
    except InvalidURL:
        return None  # not an object URL we could proxy: let the library report on it
    if upstream.netloc == daemon.netloc or not settings.hosts.permits(upstream):
        return None
    return proxied_url(url, settings.proxy), upstream.url


def rewrite(url: str) -> str:
    """The URL transparent mode reads ``url`` from.

    Unchanged unless NWBCACHE_URL is set, ``url`` is an http(s) URL of an
    allowed upstream and does not already point at the daemon; otherwise what
    :func:`nwbcache.routing.route` says (daemon, or upstream after a warning,
    or DaemonUnavailable under NWBCACHE_FALLBACK=0).
    """
    if _writing.get():
        return url
    try:
        settings = current()
    except InvalidURL as exc:
        _warn_config_once(f"nwbcache: {env.ENV_HOSTS} is invalid ({exc}); transparent mode is off")
        return url
    if settings.proxy is None or not url[:8].lower().startswith(("http://", "https://")):
        return url
    try:
        plan = _plan(url, settings)
    except InvalidURL as exc:
        _warn_config_once(f"nwbcache: {env.ENV_URL} is invalid ({exc}); transparent mode is off")
        return url
    return url if plan is None else choose(*plan, settings.proxy)


# -- remfile -------------------------------------------------------------------


class _RoutedURL:
    """A remfile URL provider (``get_url()``, e.g. renewing presigned URLs), routed."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def get_url(self) -> str:
        return rewrite(self._inner.get_url())

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def _routed(url: Any) -> Any:
    if isinstance(url, str):
        return rewrite(url)
    if callable(getattr(url, "get_url", None)):
        return _RoutedURL(url)
    return url


def patch_remfile(module: ModuleType) -> None:
    """Route the URL given to ``remfile.RemFile`` (module ``remfile.RemFile``)."""
    cls = module.RemFile
    original = cls.__init__
    if getattr(original, _PATCHED, False):
        return

    @functools.wraps(original)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        if args:
            args = (_routed(args[0]), *args[1:])
            url = args[0]
        elif "url" in kwargs:
            kwargs["url"] = url = _routed(kwargs["url"])
        else:
            url = None
        offline = env.offline() and isinstance(url, str) and _through_daemon(url)
        if offline and kwargs.get("_size") is None:
            # remfile learns the size with a plain GET of its own; given it,
            # every request goes through the session, which says only-if-cached.
            from .reading import cached_size

            assert isinstance(url, str)
            kwargs["_size"] = cached_size(url)
        original(self, *args, **kwargs)
        if offline and getattr(self, "session", None) is not None:
            from .reading import OFFLINE_HEADERS

            self.session.headers.update(OFFLINE_HEADERS)

    setattr(__init__, _PATCHED, True)
    cls.__init__ = __init__


def _through_daemon(url: str) -> bool:
    """Whether ``url`` (as routed) points at the daemon of NWBCACHE_URL."""
    proxy = env.proxy()
    return proxy is not None and url.startswith(proxy.rstrip("/") + "/")


# -- fsspec --------------------------------------------------------------------


def _checked_first(
    original: Callable[..., Awaitable[Any]],
) -> Callable[..., Awaitable[Any]]:
    """Route ``url`` before a method whose ``except Exception`` would hide why it failed.

    fsspec's ``_info`` turns any error into FileNotFoundError and ``_exists``
    into False; a DaemonUnavailable raised inside them would read as "no such
    file". Routing first raises it as itself (and the answer is then cached).
    """

    @functools.wraps(original)
    async def method(self: Any, url: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(url, str):
            rewrite(url)
        return await original(self, url, *args, **kwargs)

    setattr(method, _PATCHED, True)
    return method


def _upstream_only(original: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    @functools.wraps(original)
    async def method(self: Any, *args: Any, **kwargs: Any) -> Any:
        token = _writing.set(True)
        try:
            return await original(self, *args, **kwargs)
        finally:
            _writing.reset(token)

    setattr(method, _PATCHED, True)
    return method


def patch_fsspec_http(module: ModuleType) -> None:
    """Route the requests of ``fsspec.implementations.http.HTTPFileSystem``."""
    cls = module.HTTPFileSystem
    encode_url = cls.encode_url
    if getattr(encode_url, _PATCHED, False):
        return

    @functools.wraps(encode_url)
    def routed_encode_url(self: Any, url: Any) -> Any:
        return encode_url(self, rewrite(url) if isinstance(url, str) else url)

    setattr(routed_encode_url, _PATCHED, True)
    init = cls.__init__

    @functools.wraps(init)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        if env.offline():  # every request of this filesystem: only-if-cached
            from .reading import OFFLINE_HEADERS

            self.kwargs["headers"] = {**(self.kwargs.get("headers") or {}), **OFFLINE_HEADERS}

    cls.__init__ = __init__
    for name in ("_info", "_exists"):
        setattr(cls, name, _checked_first(getattr(cls, name)))
    for name in ("_put_file", "_pipe_file"):
        if hasattr(cls, name):
            setattr(cls, name, _upstream_only(getattr(cls, name)))
    cls.encode_url = routed_encode_url
