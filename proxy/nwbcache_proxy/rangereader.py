"""What a read hands the server: whether its range came from cache, and its bytes, a
write's worth at a time (reader.py makes it)."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncGenerator, AsyncIterator

from .blockfile import Buffer
from .readfor import CacheOutcome

# What a reader yields: consecutive pieces of the range, to go out in one write
# (batching.py).
Segments = list[Buffer]


@dataclasses.dataclass
class Tally:
    """Bytes of a stream that came from upstream, counted as they go out."""

    upstream: int = 0


class RangeReader:
    """The bytes of one range, and whether they came from cache.

    Iterate it once, a list of consecutive pieces (Segments) at a time, each
    to go out in one write; ``aclose`` ends its generator whether or not it
    was iterated (a fetch it joined stops waiting for it).

    A reader made with ``of_body`` holds the whole range in memory (a small
    hit): the server answers it with one write, and neither iterating nor
    closing it costs anything on that path.
    """

    def __init__(
        self,
        outcome: CacheOutcome,
        segments: AsyncGenerator[Segments, None] | None,
        body: Buffer | None = None,
        tally: Tally | None = None,
    ) -> None:
        self.outcome = outcome
        self.body = body
        self._segments = segments
        self._tally = tally  # (none for a body in memory: counted before)

    @property
    def outcome_sent(self) -> CacheOutcome:
        """What the response turned out to be once sent (for its log line and
        metrics; its headers went out with ``outcome``): a HIT some of whose
        bytes had to come from upstream after all (a block found corrupt as it
        went out, and fetched again) was PARTIAL."""
        if self.outcome == CacheOutcome.HIT and self._tally is not None and self._tally.upstream:
            return CacheOutcome.PARTIAL
        return self.outcome

    @classmethod
    def of_body(cls, outcome: CacheOutcome, body: Buffer) -> RangeReader:
        return cls(outcome, None, body)

    def __aiter__(self) -> AsyncIterator[Segments]:
        if self._segments is None:
            assert self.body is not None
            return _one(self.body)
        return self._segments

    async def aclose(self) -> None:
        if self._segments is not None:
            await self._segments.aclose()


async def _one(body: Buffer) -> AsyncGenerator[Segments, None]:
    yield [body]
