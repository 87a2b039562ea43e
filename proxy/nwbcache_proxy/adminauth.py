"""Who may call the admin API (``/admin/...``). Pure.

With a token (``--admin-token-file``) every admin call must carry it as
``Authorization: Bearer <token>``, compared in constant time. Without one, a
daemon accepts admin calls only while it listens on loopback alone, only
from requests no reverse proxy relayed (a balancer on the same machine
connects over loopback too, but speaks for clients anywhere), and only when
they name the daemon by a loopback ``Host`` (a web page that rebinds its own
name to 127.0.0.1 does not). Whatever the token, requests a web browser
makes (they carry ``Origin`` or ``Sec-Fetch-Site``) are refused, and a POST
must say ``Content-Type: application/json``, which a page cannot send to
another origin without asking first: no page a user visits can drive the
API. Refusals say how to set a token; they never echo what was sent.
"""

from __future__ import annotations

import dataclasses
import hmac
import ipaddress
from collections.abc import Iterable, Mapping

# Where the admin API lives: never a proxied URL, and not client traffic (not
# in the access log or the request metrics: adminserver.py logs what it does).
ADMIN_PREFIX = "/admin/"
# Headers a reverse proxy adds: the request did not start on this machine.
FORWARDING_HEADERS = ("Forwarded", "X-Forwarded-For", "X-Real-IP", "Via")
# Headers only a web browser sends on a request a page makes.
BROWSER_HEADERS = ("Origin", "Sec-Fetch-Site")
JSON = "application/json"

HOW_TO_SET = (
    "start the daemon with --admin-token-file FILE (env NWBCACHE_ADMIN_TOKEN_FILE) and "
    "send 'Authorization: Bearer <token>' (nwbcache reads it from NWBCACHE_ADMIN_TOKEN "
    "or --token-file)"
)


@dataclasses.dataclass(frozen=True, slots=True)
class Refusal:
    status: int  # 401: no or a wrong token; 403: admin calls are off here
    message: str

    @property
    def challenge(self) -> bool:
        """Whether the response names the scheme (``WWW-Authenticate: Bearer``)."""
        return self.status == 401


def is_loopback(host: str) -> bool:
    """Whether a listen address reaches this machine only."""
    host = host.strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name, or "" / "0.0.0.0"-like: anything may resolve to it


def authorize(
    token: bytes | None,
    headers: Mapping[str, str],
    *,
    listen_hosts: Iterable[str],
    method: str = "GET",
) -> Refusal | None:
    """None if the request may use the admin API, else why not."""
    if any(name in headers for name in BROWSER_HEADERS):
        return Refusal(403, "admin calls from web pages are refused: use nwbcache or curl")
    if method == "POST" and headers.get("Content-Type", "").split(";")[0].strip() != JSON:
        return Refusal(415, f"admin calls send JSON: Content-Type: {JSON}")
    if token is not None:
        presented = bearer(headers.get("Authorization"))
        if presented is None:
            return Refusal(401, f"the admin API needs a token: {HOW_TO_SET}")
        if not hmac.compare_digest(presented, token):
            return Refusal(401, "the admin token is wrong")
        return None
    beyond = sorted(h for h in listen_hosts if not is_loopback(h))
    if beyond:
        return Refusal(
            403,
            f"admin calls are off: this daemon listens beyond loopback ({', '.join(beyond)}) "
            f"and has no admin token; {HOW_TO_SET}",
        )
    if any(name in headers for name in FORWARDING_HEADERS):
        return Refusal(
            403,
            "admin calls are off for requests relayed by a proxy when the daemon has no "
            f"admin token; {HOW_TO_SET}",
        )
    if not is_loopback(host_of(headers.get("Host", ""))):
        return Refusal(
            403,
            "admin calls without a token must name the daemon by a loopback address "
            f"(Host: 127.0.0.1, localhost or [::1]); {HOW_TO_SET}",
        )
    return None


def host_of(value: str) -> str:
    """The host of a ``Host`` header (``[::1]:8080``, ``localhost:8080``)."""
    value = value.strip()
    if value.startswith("["):
        return value[: value.find("]") + 1] if "]" in value else value
    return value.rpartition(":")[0] if value.count(":") == 1 else value


def bearer(value: str | None) -> bytes | None:
    """The token of an ``Authorization: Bearer <token>`` value, else None."""
    if value is None:
        return None
    scheme, _, rest = value.strip().partition(" ")
    if scheme.lower() != "bearer" or not rest.strip():
        return None
    return rest.strip().encode("utf-8", "surrogateescape")
