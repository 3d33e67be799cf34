"""The rules a request must keep, each in one place: names, scales, sizes and variables.

Every way in (CLI, API, task API) and the catalogue call these; a broken rule raises BadInput
before anything changes.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

from orchestrator import service_types
from orchestrator.errors import BadInput
from orchestrator.models import ScaleChange, ServiceType
from orchestrator.sizes import Size, parse_size

MAX_SCALE = 1000  # jobs of one kind (deploy, or one worker target) of one service
MAX_VARIABLE_NAME = 255
MAX_VARIABLE_VALUE = 65536

_DNS_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
_VARIABLE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def check_name(kind: str, name: str) -> str:
    """Names of hosts, environments, services, worker targets and tokens are DNS labels."""
    if not _DNS_LABEL.fullmatch(name):
        raise BadInput(f"{kind} name {name!r} is not a DNS label (a-z, 0-9 and '-', at most 63)")
    return name


def check_scale(type_: ServiceType, scale: object, *, what: str = "scale") -> int:
    """A whole number (never a bool or a string, whoever sends it) of 0 to MAX_SCALE jobs;
    databases and caches run one."""
    if isinstance(scale, bool) or not isinstance(scale, int):
        raise BadInput(f"{what} must be an integer, not {scale!r}")
    if scale < 0:
        raise BadInput(f"{what} {scale} is below 0: it must be 0 or more")
    if scale > MAX_SCALE:
        raise BadInput(f"{what} {scale} is above the maximum of {MAX_SCALE}")
    if service_types.profile(type_).single_job and scale > 1:
        raise BadInput(f"{type_} services run one job (one copy of the data, one kept port): "
                       "scale above 1 is refused")
    return scale


def parse_scale_change(text: str) -> ScaleChange:
    """``N``, ``+N`` or ``-N``."""
    body = text.strip()
    sign = body[:1] if body[:1] in "+-" else ""
    digits = body[len(sign):]
    if not digits.isdigit():
        raise BadInput(f"worker scale {text!r} is not N, +N or -N")
    number = int(digits)
    return ScaleChange(number=-number if sign == "-" else number, relative=bool(sign))


def check_size(text: str) -> Size:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise BadInput(str(exc)) from None


def parse_assignments(pairs: Iterable[str]) -> dict[str, str]:
    """KEY=VALUE words -> a dict; a word without '=' is refused (names are checked on set)."""
    updates = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise BadInput(f"{pair!r} is not KEY=VALUE")
        updates[key] = value
    return updates


def check_variables(values: Mapping[str, object]) -> dict[str, str]:
    """User variables: shell-style names, bounded sizes, no NUL, and never the platform's own."""
    if not values:
        raise BadInput("no variables given")
    for key, value in values.items():
        if not _VARIABLE_NAME.fullmatch(key):
            raise BadInput(f"variable name {key!r} must be letters, digits and _, not starting with a digit")
        if not isinstance(value, str) or "\x00" in value:
            raise BadInput(f"variable {key} must be a string without NUL characters")
        if len(key) > MAX_VARIABLE_NAME or len(value) > MAX_VARIABLE_VALUE:
            raise BadInput(f"variable {key[:40]}: names take at most {MAX_VARIABLE_NAME} characters, "
                           "values 64 KiB")
        if key == "PORT" or key.startswith("ORCH_"):
            raise BadInput(f"{key} is set by the platform for every job and cannot be overridden")
    return {k: str(v) for k, v in values.items()}


def check_image_reference(image: object) -> str:
    if not isinstance(image, str):
        raise BadInput("image must be a string")
    if not image.strip() or any(c.isspace() for c in image):
        raise BadInput(f"image {image!r} is not an image reference")
    return image

MAX_ID = 2**63 - 1  # what the databases' integers hold; a larger id or number names nothing
