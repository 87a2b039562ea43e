"""Human-readable byte sizes for the command line: ``500M``, ``1.5G``, ``1 GiB``.

Every unit is binary (1 K = 1024 B), including the SI-looking ``KB``/``MB``/``GB``:
cache and block sizes are thought of in powers of two (a ``--block-size 4M``
should be exactly 4 MiB so blocks line up with readers' power-of-two chunks),
and it is what ``du -h`` and ``ls -h`` mean by K, M and G. Reading ``1GB`` as
10**9 would silently make a cache 7% smaller than its owner expects.
"""

from __future__ import annotations

import re
from fractions import Fraction

# Suffix (lower case) -> bytes. "", "b"; then k, kb, kib; m, mb, mib; ...
_MULTIPLIERS: dict[str, int] = {"": 1, "b": 1} | {
    letter + tail: 1024**power
    for power, letter in enumerate("kmgt", start=1)
    for tail in ("", "b", "ib")
}

# A non-negative decimal number, optional blanks, optional unit letters. [0-9]
# rather than \d, which also matches non-ASCII digits; the digit counts bound
# the work done on hostile input (10**30 B is far beyond any disk).
_SIZE = re.compile(r"([0-9]{1,30}(?:\.[0-9]{1,30})?|\.[0-9]{1,30})[ \t]*([A-Za-z]{0,3})")

_ACCEPTED_FORMS = (
    "a non-negative number with an optional binary unit "
    "B, K/KB/KiB, M/MB/MiB, G/GB/GiB or T/TB/TiB (1K = 1024 B), "
    "e.g. 512B, 256K, 4M, 1.5G, '1 GiB', 1048576"
)

_UNIT_NAMES = ("B", "KiB", "MiB", "GiB", "TiB")


def parse_size(text: str) -> int:
    """Bytes in ``text``, case-insensitive; fractions of a byte are dropped.

    Raises ValueError naming the accepted forms for anything else (empty,
    negative, nan/inf, unknown unit).
    """
    match = _SIZE.fullmatch(text.strip())
    multiplier = None if match is None else _MULTIPLIERS.get(match[2].lower())
    if match is None or multiplier is None:
        raise ValueError(f"invalid size {text!r}: expected {_ACCEPTED_FORMS}")
    # Fraction keeps "1.1G" exact where a float would round; int() then drops
    # the fraction of a byte (floor, as the number is never negative).
    return int(Fraction(match[1]) * multiplier)


def format_size(n: int) -> str:
    """``n`` bytes in the largest binary unit it reaches, to at most two
    decimals with trailing zeros dropped: "0 B", "100 B", "256 KiB", "1.5 GiB".
    parse_size reads the result back."""
    if n < 0:
        raise ValueError(f"size must be >= 0, got {n}")
    power = 0
    while power + 1 < len(_UNIT_NAMES) and n >= 1024 ** (power + 1):
        power += 1
    # Integer arithmetic: hundredths of the unit, rounded half up.
    unit = 1024**power
    hundredths = (n * 100 + unit // 2) // unit
    if hundredths >= 1024 * 100 and power + 1 < len(_UNIT_NAMES):
        # 1023.999 KiB would print as "1024 KiB"; say "1 MiB" instead.
        power += 1
        unit *= 1024
        hundredths = (n * 100 + unit // 2) // unit
    whole, fraction = divmod(hundredths, 100)
    number = str(whole) if fraction == 0 else f"{whole}.{fraction:02d}".rstrip("0")
    return f"{number} {_UNIT_NAMES[power]}"
