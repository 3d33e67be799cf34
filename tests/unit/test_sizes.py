"""parse_size: named sizes and MEMORY[:CPUS]."""

from __future__ import annotations

import pytest
from hypothesis import example, given, settings
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


NAMED = {"xs": Size(128, 0.25), "s": Size(256, 0.5), "m": Size(512, 1.0), "l": Size(1024, 2.0),
         "xl": Size(2048, 4.0)}


def ascii_digits(text: str) -> bool:
    return text != "" and all(c in "0123456789" for c in text)


def expected_size(text: str) -> Size | None:
    """What parse_size must return for ``text``, worked out without its regular expression; None
    where it must raise ValueError. Digits are ASCII digits only (Arabic-Indic digits make no size)."""
    key = text.strip().lower()
    if key in NAMED:
        return NAMED[key]
    memory, colon, cpus = key.partition(":")
    amount, unit = memory[:-1], memory[-1:]
    if unit not in ("m", "g") or not ascii_digits(amount):
        return None
    if colon:
        whole, dot, fraction = cpus.partition(".")
        if not ascii_digits(whole) or (dot and not ascii_digits(fraction)):
            return None
    size = Size(int(amount) * (1024 if unit == "g" else 1), float(cpus) if colon else 0.5)
    return size if size.memory_mb >= 6 and size.cpus > 0 else None


# Text near the grammar (so valid sizes and each way to miss it come up often), and any text.
near_sizes = st.builds(
    "{}{}{}{}{}".format,
    st.sampled_from(["", " ", "\t"]),
    st.one_of(st.integers(0, 12).map(str), st.integers(0, 5000).map(str),
              st.sampled_from(["", "007", "-1", "1.5", "+2", "\u0664\u0668"])),
    st.one_of(st.sampled_from("mMgG"), st.sampled_from(["k", "mb", "", "s", "xl"])),
    st.one_of(st.just(""), st.from_regex(r"\A:[0-9]{1,2}(\.[0-9]{1,2})?\Z"),
              st.sampled_from([":", ":0", ":0.0", ":00.5", ":-1", ":.5", ":1.", ":abc", ":1:2", ": 1"])),
    st.sampled_from(["", " ", "\n"]),
)


@given(st.one_of(near_sizes, st.text(max_size=12)))
@example("5m")  # the boundaries, every run
@example("6m")
@example("0g")
@example("6m:0.01")
@example("1g:0")
@example("1g")
@settings(max_examples=1000)
def test_property_any_text_is_the_expected_size_or_a_value_error(text: str) -> None:
    expected = expected_size(text)
    if expected is None:
        with pytest.raises(ValueError):
            parse_size(text)
    else:
        assert parse_size(text) == expected
