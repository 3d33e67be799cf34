"""The request rules (orchestrator/rules.py): each in one place, each refusal one line."""

from __future__ import annotations

import pytest

from orchestrator.errors import BadInput
from orchestrator.models import ScaleChange, ServiceType
from orchestrator.rules import (
    MAX_SCALE,
    check_name,
    check_scale,
    check_variables,
    parse_assignments,
    parse_scale_change,
)


@pytest.mark.parametrize("name", ["a", "web", "a-b", "x" * 63, "0db"])
def test_dns_labels_are_names(name: str) -> None:
    assert check_name("service", name) == name


@pytest.mark.parametrize("name", ["", "-a", "a-", "A", "a_b", "x" * 64, "web\n", "a.b", "wéb"])
def test_other_names_are_refused(name: str) -> None:
    with pytest.raises(BadInput, match="not a DNS label"):
        check_name("service", name)


@pytest.mark.parametrize("scale", [0, 1, MAX_SCALE])
def test_scales_in_range(scale: int) -> None:
    assert check_scale(ServiceType.code, scale) == scale


def test_scale_bounds() -> None:
    with pytest.raises(BadInput, match="below 0"):
        check_scale(ServiceType.code, -1)
    with pytest.raises(BadInput, match=f"above the maximum of {MAX_SCALE}"):
        check_scale(ServiceType.code, MAX_SCALE + 1)
    with pytest.raises(BadInput, match="worker target q scale -2 is below 0"):
        check_scale(ServiceType.code, -2, what="worker target q scale")


@pytest.mark.parametrize("kind", [ServiceType.postgresql, ServiceType.mysql, ServiceType.redis,
                                  ServiceType.memcached])
def test_databases_and_caches_run_one_job(kind: ServiceType) -> None:
    assert check_scale(kind, 1) == 1 and check_scale(kind, 0) == 0
    with pytest.raises(BadInput, match="scale above 1 is refused"):
        check_scale(kind, 2)


@pytest.mark.parametrize("value", [True, False, "2", 2.0, None])
def test_a_scale_from_a_program_is_an_integer(value: object) -> None:
    with pytest.raises(BadInput, match="scale must be an integer"):
        check_scale(ServiceType.code, value)


@pytest.mark.parametrize(("text", "change", "from_two"), [
    ("3", ScaleChange(number=3), 3),
    ("+3", ScaleChange(number=3, relative=True), 5),
    ("-1", ScaleChange(number=-1, relative=True), 1),
    (" 0 ", ScaleChange(number=0), 0),
    ("-0", ScaleChange(number=0, relative=True), 2),
])
def test_worker_scale_changes(text: str, change: ScaleChange, from_two: int) -> None:
    parsed = parse_scale_change(text)
    assert parsed == change and parsed.applied_to(2) == from_two


@pytest.mark.parametrize("text", ["", "+", "lots", "1.5", "++1", "+-1", "1e3"])
def test_bad_worker_scales(text: str) -> None:
    with pytest.raises(BadInput, match="is not N, \\+N or -N"):
        parse_scale_change(text)


def test_assignments() -> None:
    assert parse_assignments(["A=1", "B=", "C=x=y"]) == {"A": "1", "B": "", "C": "x=y"}
    with pytest.raises(BadInput, match="is not KEY=VALUE"):
        parse_assignments(["A"])


@pytest.mark.parametrize(("values", "reason"), [
    ({}, "no variables"),
    ({"1A": "x"}, "must be letters"),
    ({"A B": "x"}, "must be letters"),
    ({"A\n": "x"}, "must be letters"),
    ({"PORT": "1"}, "set by the platform"),
    ({"ORCH_JOB": "1"}, "set by the platform"),
    ({"A": "a\x00b"}, "without NUL"),
    ({"A": 3}, "without NUL"),
    ({"A" * 256: "x"}, "at most 255"),
    ({"A": "x" * 65537}, "64 KiB"),
])
def test_bad_variables(values: dict[str, object], reason: str) -> None:
    with pytest.raises(BadInput, match=reason):
        check_variables(values)


def test_good_variables() -> None:
    assert check_variables({"A": "", "_B1": "x" * 65536}) == {"A": "", "_B1": "x" * 65536}
