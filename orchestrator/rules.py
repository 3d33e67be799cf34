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
MAX_OVERLAP = 86400  # seconds old jobs may outlive new ones on a redeploy
MAX_VARIABLE_NAME = 255
MAX_VARIABLE_VALUE = 65536
# What a job's environment may hold in all (user, connection and platform variables): Linux
# refuses to start a process whose arguments and environment pass about 2 MiB.
MAX_VARIABLES_TOTAL = 512 * 1024

_DNS_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
_VARIABLE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

# Set per job by the platform: a user variable of these names would change how a job starts.
PLATFORM_PORT_VARIABLES = frozenset({"PORT", *(n for p in service_types.PROFILES.values() for n in p.extra_ports)})


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


def check_overlap(seconds: object) -> int:
    if isinstance(seconds, bool) or not isinstance(seconds, int) or not 0 <= seconds <= MAX_OVERLAP:
        raise BadInput(f"overlap must be a whole number of seconds from 0 to {MAX_OVERLAP}, not {seconds!r}")
    return seconds


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
        if key in PLATFORM_PORT_VARIABLES or key.startswith("ORCH_"):
            raise BadInput(f"{key} is set by the platform for every job and cannot be overridden")
    return {k: str(v) for k, v in values.items()}


def check_variables_total(values: Mapping[str, str]) -> None:
    """All the variables a job gets fit in a process's environment."""
    total = sum(len(k) + len(v) + 2 for k, v in values.items())
    if total > MAX_VARIABLES_TOTAL:
        raise BadInput(f"the variables take {total // 1024} KiB in all: at most "
                       f"{MAX_VARIABLES_TOTAL // 1024} KiB fit in a job's environment")


# Docker's image reference grammar (distribution/reference): [domain[:port]/]path[:tag][@digest],
# where the first part is a domain only if it has a "." or a ":" or is "localhost".
_ALNUM = r"[a-z0-9]+"
_PATH_COMPONENT = re.compile(rf"{_ALNUM}(?:(?:[._]|__|-+){_ALNUM})*")
_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN = re.compile(rf"(?:{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*|\[[0-9a-fA-F:]+\])(?::[0-9]+)?")
_TAG = re.compile(r"[\w][\w.-]{0,127}")
_DIGEST = re.compile(r"[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}")
MAX_IMAGE_NAME = 255


def check_image_reference(image: object) -> str:
    """An image reference as Docker reads it, e.g. ``orch/sample-app:1``,
    ``127.0.0.1:5000/shop/web:42`` or ``name@sha256:<hex>``."""
    if not isinstance(image, str):
        raise BadInput("image must be a string")
    if not _image_reference_ok(image):
        raise BadInput(f"image {image!r} is not an image reference (like name:tag or "
                       "registry:port/name:tag, the name in lower case)")
    return image


def _image_reference_ok(image: str) -> bool:
    rest, _, digest = image.partition("@")
    if "@" in image and not _DIGEST.fullmatch(digest):
        return False
    parts = rest.split("/")
    domain = parts[0] if len(parts) > 1 and ("." in parts[0] or ":" in parts[0]
                                            or parts[0] == "localhost") else None
    path = parts[1:] if domain is not None else parts
    last, colon, tag = path[-1].partition(":")
    if colon and not _TAG.fullmatch(tag):
        return False
    path = [*path[:-1], last]
    return ((domain is None or _DOMAIN.fullmatch(domain) is not None)
            and all(_PATH_COMPONENT.fullmatch(p) for p in path)
            and len(rest) - len(colon + tag) <= MAX_IMAGE_NAME)


MAX_ID = 2**63 - 1  # what the databases' integers hold; a larger id or number names nothing


# --- the service proxy: sites, certificates, health paths, ports --------------------------------

MAX_SITE_NAME = 253
MAX_HEALTH_PATH = 200
# No quotes, spaces or backslashes: HAProxy's configuration reads them as its own syntax.
_HEALTH_PATH = re.compile(r"/[A-Za-z0-9._~!$&()*+,;=:@%/?-]*")


def check_site_name(name: object) -> str:
    """A site is a DNS host name (labels joined by dots), kept in lower case; no wildcards."""
    if not isinstance(name, str) or not name or len(name) > MAX_SITE_NAME:
        raise BadInput(f"site {name!r} is not a DNS name")
    lowered = name.lower().rstrip(".")
    if not all(_DNS_LABEL.fullmatch(label) for label in lowered.split(".")):
        raise BadInput(f"site {name!r} is not a DNS name (labels of a-z, 0-9 and '-', joined by dots)")
    return lowered


def check_health_path(path: object) -> str:
    """An HTTP path the proxy and the platform GET: it must start with / and hold no spaces."""
    if not isinstance(path, str) or not _HEALTH_PATH.fullmatch(path) or len(path) > MAX_HEALTH_PATH:
        raise BadInput(f"health path {path!r} must be a URL path: /, then no spaces or quotes "
                       f"(at most {MAX_HEALTH_PATH} characters)")
    return path


def check_proxy_port(port: object, what: str, job_ports: tuple[int, int]) -> int:
    """A proxy port: a whole number from 1024 to 65535, outside the range jobs take ports from."""
    if isinstance(port, bool) or not isinstance(port, int) or not 1024 <= port <= 65535:
        raise BadInput(f"{what} must be a port from 1024 to 65535, not {port!r}")
    if job_ports[0] <= port <= job_ports[1]:
        raise BadInput(f"{what} {port} is in the range jobs take their ports from "
                       f"({job_ports[0]}-{job_ports[1]})")
    return port


def check_certificate(site: str, cert_pem: str, key_pem: str, now: object = None) -> str:
    """A TLS site's certificate (PEM, the site's own first, then its chain) and private key:
    both must parse, the key must be the certificate's, the certificate must name the site
    (a subjectAltName DNS entry, or a wildcard one level up) and be valid now. Returns the
    chain as PEM, certificates only."""
    from datetime import UTC, datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    try:
        chain = x509.load_pem_x509_certificates(cert_pem.encode())
    except ValueError:
        raise BadInput(f"the certificate for {site} is not a PEM certificate") from None
    try:
        key = serialization.load_pem_private_key(key_pem.encode(), password=None)
    except (ValueError, TypeError):
        raise BadInput(f"the key for {site} is not an unencrypted PEM private key") from None
    leaf = chain[0]
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    encoding = serialization.Encoding.DER
    if key.public_key().public_bytes(encoding, public) != leaf.public_key().public_bytes(encoding, public):
        raise BadInput(f"the key for {site} does not match its certificate")
    _check_strength(site, leaf, key)
    names = _certificate_names(leaf)
    if not any(_name_matches(pattern, site) for pattern in names):
        shown = ", ".join(names) or "no DNS name"
        raise BadInput(f"the certificate is for {shown}, not for {site}")
    when = now if isinstance(now, datetime) else datetime.now(UTC)
    if not leaf.not_valid_before_utc <= when <= leaf.not_valid_after_utc:
        raise BadInput(f"the certificate for {site} is not valid now (valid from "
                       f"{leaf.not_valid_before_utc:%Y-%m-%d} to {leaf.not_valid_after_utc:%Y-%m-%d})")
    return "".join(c.public_bytes(serialization.Encoding.PEM).decode() for c in chain)


def _check_strength(site: str, leaf: object, key: object) -> None:
    """What OpenSSL 3 (HAProxy's) refuses by default: RSA keys under 2048 bits, EC keys under
    256, MD5 or SHA-1 signatures. Refused here, so the proxy never reloads onto a refusal."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    assert isinstance(leaf, x509.Certificate)
    if isinstance(key, rsa.RSAPrivateKey) and key.key_size < 2048:
        raise BadInput(f"the key for {site} is RSA {key.key_size}: at least 2048 bits")
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.key_size < 256:
        raise BadInput(f"the key for {site} is EC {key.curve.key_size}: at least 256 bits")
    if not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
        raise BadInput(f"the key for {site} is neither RSA nor EC")
    algorithm = leaf.signature_hash_algorithm
    if algorithm is None or isinstance(algorithm, hashes.MD5 | hashes.SHA1):
        name = algorithm.name if algorithm is not None else "none"
        raise BadInput(f"the certificate for {site} is signed with {name}: use SHA-256 or better")


def _certificate_names(cert: object) -> list[str]:
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    assert isinstance(cert, x509.Certificate)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        return [n.lower() for n in san.value.get_values_for_type(x509.DNSName)]
    except x509.ExtensionNotFound:
        return [str(a.value).lower() for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]


def _name_matches(pattern: str, site: str) -> bool:
    if pattern.startswith("*."):
        head, _, rest = site.partition(".")
        return bool(head) and rest == pattern[2:]
    return pattern == site
