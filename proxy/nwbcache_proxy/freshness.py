"""How long a cached version may be served without asking upstream, and what to do after. Pure.

- **Immutable** objects (``--immutable``: DANDI blobs, whose keys are
  written once; any URL naming a ``versionId``) are never revalidated.
- A **mutable** object is fresh for ``--revalidate-after`` seconds after
  upstream last confirmed it. Then it is stale: still served at once (marked
  ``X-Cache: STALE``) while a conditional request revalidates it in the
  background, for up to ``--stale-if-error`` more seconds (RFC 5861); a
  revalidation that fails (upstream down) leaves it serving stale until then.
- Past that, or while the object's privacy is not known, nothing is served
  before upstream has been asked (a discovery).
- ``Cache-Control: only-if-cached`` (RFC 9111 §5.2.1.7) never asks upstream:
  what is stored is served, however old; what is not is a 504.
"""

from __future__ import annotations

import dataclasses
import enum

# After a background revalidation failed, the next one waits this long: a
# popular object read while upstream is down must not become a stream of
# doomed upstream requests (the circuit breaker stops those too).
RETRY_REVALIDATION = 10.0


class Freshness(enum.Enum):
    FRESH = "fresh"  # serve; nothing to ask
    STALE = "stale"  # serve now, marked STALE; revalidate in the background
    EXPIRED = "expired"  # ask upstream (discover) before serving


@dataclasses.dataclass(frozen=True, slots=True)
class Policy:
    revalidate_after: float
    stale_if_error: float

    def judge(
        self,
        *,
        age: float,
        immutable: bool,
        privacy_known: bool,
        offline: bool = False,
        revalidate: bool = False,
    ) -> Freshness:
        """How a version last confirmed ``age`` seconds ago may be served.
        ``revalidate``: the request asks for upstream's word (``Cache-Control:
        no-cache``, ``max-age=0``) or the version was just found changed."""
        if not privacy_known:
            return Freshness.EXPIRED  # offline too: who may read it is not known
        if immutable:
            return Freshness.FRESH
        if revalidate and not offline:
            return Freshness.EXPIRED
        if age < self.revalidate_after:
            return Freshness.FRESH
        if offline or age < self.revalidate_after + self.stale_if_error:
            return Freshness.STALE
        return Freshness.EXPIRED

    @staticmethod
    def should_revalidate(*, now: float, last_attempt: float | None, running: bool) -> bool:
        """Whether a stale version's background revalidation starts now."""
        if running:
            return False
        return last_attempt is None or now - last_attempt >= RETRY_REVALIDATION
