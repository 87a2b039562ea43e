"""One error family for the daemon, each carrying the HTTP status it means.

Modelled on h11's ``ProtocolError(msg, error_status_hint)``: code deep in the
stack raises with the meaning it knows, and exactly one place (``server``)
turns errors into responses.
"""

from __future__ import annotations


class ProxyError(Exception):
    """Base of every error the daemon answers a client with."""

    status: int = 500
    # Seconds the client should wait before asking again (a Retry-After header).
    retry_after: float | None = None
    # An answer about the object itself (as upstream would give it), not a
    # failure of this daemon: a child daemon passes it on (parents.py).
    about_object: bool = False
    # Headers the answer carries besides the error's own (Content-Range, ETag, ...).
    headers: dict[str, str] | None = None

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status


class BadRequest(ProxyError):
    """The client's request is malformed (400)."""

    status = 400


class NotAllowed(ProxyError):
    """The upstream host is not on the allow-list (403): no request leaves the machine."""

    status = 403


class UpstreamStatus(ProxyError):
    """Upstream answered with a definitive, non-retryable status we pass on truthfully."""

    about_object = True

    def __init__(self, message: str, *, status: int) -> None:
        super().__init__(message, status=status)


class UpstreamUnavailable(ProxyError):
    """Upstream could not be reached or kept failing after retries (502)."""

    status = 502


class UpstreamTimeout(UpstreamUnavailable):
    """Upstream did not answer in time after retries (504)."""

    status = 504


class UpstreamProtocolError(UpstreamUnavailable):
    """Upstream answered something we refuse to store (wrong Content-Range, short body...)."""


class VersionChanged(ProxyError):
    """The object changed upstream (ETag/size differ, or 412 on If-Match).

    The cached blocks of the old version are dropped. A request that has not
    sent headers yet starts over; one that has is cut short, so a client sees
    an error rather than bytes of two versions.
    """

    status = 503


class RetryableFault(Exception):
    """Internal: an upstream attempt failed in a way worth retrying.

    Never reaches a client: the retry loop either retries or converts it into
    an ``UpstreamUnavailable``/``UpstreamTimeout``.
    """

    def __init__(self, message: str, *, reason: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.retry_after = retry_after
        # A parent failed (parents.py): the next attempt asks another source,
        # at once, without spending an attempt or retry budget.
        self.elsewhere = False


class NotCached(ProxyError):
    """``Cache-Control: only-if-cached`` and the answer is not (all) in the cache (504)."""

    status = 504


class UpstreamDown(ProxyError):
    """Upstream's circuit breaker is open (breaker.py): failing at once (503)."""

    status = 503

    def __init__(self, message: str, *, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class LoopDetected(ProxyError):
    """The request has passed this daemon already (its Via names it), or too
    many daemons: a parent configuration that loops (508, RFC 5842; a child
    takes it as a refusal of one request, parents.parent_unwell)."""

    status = 508


class PreconditionFailed(ProxyError):
    """The request's If-Match / If-Unmodified-Since does not hold for the object (412)."""

    status = 412
    about_object = True


class RangeNotSatisfiable(ProxyError):
    """No range of the request lies inside the object (416); ``headers`` carry
    ``Content-Range: bytes */<size>`` and the object's validators."""

    status = 416
    about_object = True

    def __init__(self, message: str, *, size: int, requested: str, headers: dict[str, str]) -> None:
        super().__init__(message)
        self.size = size
        self.requested = requested  # the Range field as sent (S3's <RangeRequested>)
        self.headers = headers
