"""parse_size: named sizes and MEMORY[:CPUS]."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from orchestrator.sizes import DEFAULT_SIZE, NAMED_SIZES, Size, parse_size


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("xs", Size(128, 0.25)),
        ("s", Size(256, 0.5)),
        ("m", Size(512, 1.0)),
        ("l", Size(1024, 2.0)),
        ("xl", Size(2048, 4.0)),
        (" M ", Size(512, 1.0)),
        ("XL", Size(2048, 4.0)),
    ],
)
def test_named_sizes(text: str, expected: Size) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("512m", Size(512, NAMED_SIZES[DEFAULT_SIZE].cpus)),
        ("300M", Size(300, NAMED_SIZES[DEFAULT_SIZE].cpus)),
        ("1g", Size(1024, NAMED_SIZES[DEFAULT_SIZE].cpus)),
        ("1g:2", Size(1024, 2.0)),
        ("2G:1.5", Size(2048, 1.5)),
        ("512m:0.5", Size(512, 0.5)),
        ("6m:0.01", Size(6, 0.01)),
        ("64m:8", Size(64, 8.0)),
    ],
)
def test_explicit_sizes(text: str, expected: Size) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "neither a named size"),
        ("huge", "neither a named size"),
        ("512", "neither a named size"),
        ("512k", "neither a named size"),
        ("512mb", "neither a named size"),
        ("1.5g", "neither a named size"),
        ("-1m", "neither a named size"),
        ("1g:", "neither a named size"),
        ("1g:abc", "neither a named size"),
        ("1g:-1", "neither a named size"),
        ("m:2", "neither a named size"),
        ("1g 2", "neither a named size"),
        ("0m", "at least 6m"),
        ("5m", "at least 6m"),
        ("1g:0", "more than 0"),
        ("1g:0.0", "more than 0"),
    ],
)
def test_bad_sizes_raise_a_clear_value_error(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_size(text)


def test_the_unparseable_message_names_the_input_and_the_choices() -> None:
    with pytest.raises(ValueError) as info:
        parse_size("enormous")
    text = str(info.value)
    assert "'enormous'" in text
    assert all(name in text for name in NAMED_SIZES)
    assert "MEMORY[:CPUS]" in text
    assert "\n" not in text  # the CLI prints it as its one-line reason


@given(amount=st.integers(6, 10**6), unit=st.sampled_from("mMgG"), cpus=st.integers(1, 64))
def test_property_explicit_sizes_round_trip(amount: int, unit: str, cpus: int) -> None:
    size = parse_size(f"{amount}{unit}:{cpus}")
    assert size.memory_mb == amount * (1024 if unit in "gG" else 1)
    assert size.cpus == cpus


@given(st.text(max_size=12))
def test_property_any_text_is_a_size_or_a_value_error(text: str) -> None:
    try:
        size = parse_size(text)
    except ValueError:
        return
    assert size.memory_mb >= 6 and size.cpus > 0
