"""Tests of nwbcache_proxy.sizes: human sizes, all binary units."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nwbcache_proxy.sizes import format_size, parse_size

KiB, MiB, GiB, TiB = 1024, 1024**2, 1024**3, 1024**4

PARSE_CASES = [
    ("500M", 500 * MiB),
    ("20G", 20 * GiB),
    ("256K", 256 * KiB),
    ("4M", 4 * MiB),
    ("1.5G", 3 * GiB // 2),
    ("1GiB", GiB),
    ("1 GB", GiB),  # KB/MB/GB are binary too
    ("1KB", KiB),
    ("1048576", MiB),
    ("2T", 2 * TiB),
    ("2TiB", 2 * TiB),
    ("512B", 512),
    ("0", 0),
    ("0B", 0),
    ("0.0G", 0),
    ("1", 1),
    ("4m", 4 * MiB),  # case-insensitive
    ("1gib", GiB),
    ("1GIB", GiB),
    ("1Mb", MiB),
    ("1b", 1),
    ("  4M  ", 4 * MiB),
    ("1\tG", GiB),
    (".5K", 512),
    ("0.1K", 102),  # 102.4 rounded down
    ("1.5B", 1),
    ("1.1G", 1181116006),  # exact: a float would give 1181116006.4000001
    ("1.999999999999999999999K", 2047),
    ("007K", 7 * KiB),
    ("9" * 30, int("9" * 30)),
]


@pytest.mark.parametrize(("text", "expected"), PARSE_CASES)
def test_parse_size(text: str, expected: int) -> None:
    result = parse_size(text)
    assert type(result) is int
    assert result == expected


INVALID_SIZES = [
    "",
    "   ",
    "-1",
    "-1G",
    "+1G",
    "nan",
    "inf",
    "NaN",
    "-inf",
    "1X",
    "1P",  # petabytes are not offered
    "1PB",
    "1KK",
    "1kibi",
    "1iB",
    "G",
    "1.5.5G",
    "1.G",
    "1 G B",
    "1e3",
    "0x10",
    "1,000",
    "1_000",
    "1 000",
    "１",  # fullwidth digit
    "٣K",  # Arabic-Indic digit
    "9" * 31,  # too many digits
]


@pytest.mark.parametrize("text", INVALID_SIZES)
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(ValueError, match=r"invalid size .*K/KB/KiB.*e\.g\. 512B") as info:
        parse_size(text)
    assert repr(text) in str(info.value)  # the message quotes the bad input


FORMAT_CASES = [
    (0, "0 B"),
    (1, "1 B"),
    (100, "100 B"),
    (1023, "1023 B"),
    (KiB, "1 KiB"),
    (1536, "1.5 KiB"),
    (1280, "1.25 KiB"),
    (1034, "1.01 KiB"),
    (1030, "1.01 KiB"),  # 1.00586 rounds half up to 1.01
    (1029, "1 KiB"),  # 1.00488 rounds to 1.00, printed without decimals
    (256 * KiB, "256 KiB"),
    (4 * MiB, "4 MiB"),
    (500 * MiB, "500 MiB"),
    (MiB - 1, "1 MiB"),  # not "1024 KiB"
    (MiB - 6, "1023.99 KiB"),
    (3 * GiB // 2, "1.5 GiB"),
    (20 * GiB, "20 GiB"),
    (2 * TiB, "2 TiB"),
    (2048 * TiB, "2048 TiB"),  # no unit beyond TiB
]


@pytest.mark.parametrize(("n", "expected"), FORMAT_CASES)
def test_format_size(n: int, expected: str) -> None:
    assert format_size(n) == expected


def test_format_size_rejects_negative() -> None:
    with pytest.raises(ValueError, match="size must be >= 0"):
        format_size(-1)


# --------------------------------------------------------------------------- properties

UNITS = {"": 1, "B": 1, "K": KiB, "M": MiB, "G": GiB, "T": TiB}


@given(n=st.integers(min_value=0, max_value=5000 * TiB))
def test_format_then_parse_is_close(n: int) -> None:
    parsed = parse_size(format_size(n))
    # Two decimals of the largest unit reached: error at most 0.5% (+1 for flooring).
    assert abs(parsed - n) <= n / 199 + 1


@given(
    count=st.integers(min_value=1, max_value=1023),
    unit=st.sampled_from(["B", "KiB", "MiB", "GiB", "TiB"]),
)
def test_whole_units_round_trip_exactly(count: int, unit: str) -> None:
    n = count * UNITS[unit[0]]
    assert format_size(n) == f"{count} {unit}"
    assert parse_size(format_size(n)) == n


@given(
    count=st.integers(min_value=0, max_value=10**6),
    letter=st.sampled_from(["", "K", "M", "G", "T"]),
    tail=st.sampled_from(["", "B", "iB"]),
    blank=st.sampled_from(["", " ", "\t"]),
    upper=st.booleans(),
)
def test_every_suffix_spelling_is_binary(
    count: int, letter: str, tail: str, blank: str, upper: bool
) -> None:
    if not letter and tail == "iB":
        tail = "B"  # "iB" alone is not a unit
    suffix = letter + tail
    text = f"{count}{blank}{suffix.upper() if upper else suffix.lower()}"
    assert parse_size(text) == count * UNITS[letter]


@given(
    whole=st.integers(min_value=0, max_value=10**6),
    fraction=st.text(alphabet="0123456789", min_size=1, max_size=12),
    letter=st.sampled_from(["K", "M", "G", "T"]),
)
def test_fractions_round_down_within_one_unit(whole: int, fraction: str, letter: str) -> None:
    unit = UNITS[letter]
    result = parse_size(f"{whole}.{fraction}{letter}")
    assert whole * unit <= result < (whole + 1) * unit


@given(text=st.text(max_size=12))
def test_parse_size_returns_int_or_raises_value_error(text: str) -> None:
    try:
        result = parse_size(text)
    except ValueError as error:
        assert "expected a non-negative number" in str(error)
    else:
        assert type(result) is int
        assert result >= 0
