"""Manifests: one environment declared in a YAML file, and what it takes to get there.

Pure: ``load`` turns the file's text into a validated ``Manifest`` (every key checked, with the
rules of ``rules.py``; an error names the file, the line and the key), and ``diff`` compares it with
a snapshot of the environment (``EnvState``) and returns the ``Plan``: the changes, in the order
they are to be made, each one line for people. ``orchestrator plan`` prints them,
``orchestrator apply`` makes them (``orchestrator/cli/manifest.py``). Nothing here reads a file
(the caller passes ``read`` for certificates) or the catalogue.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any

import yaml  # type: ignore[import-untyped,unused-ignore]
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, ValidationError
from pydantic_core import PydanticCustomError

from orchestrator import rules, service_types
from orchestrator.errors import BadInput
from orchestrator.models import ServiceType

Path = tuple[str, ...]  # where a key is: ("services", "web", "scale")

MAX_NODES = 100_000  # what a manifest may hold once its aliases are expanded
INCLUDED_TYPES = frozenset(i.type for i in service_types.INCLUDED_SERVICES)


class ManifestError(BadInput):
    """A manifest that cannot be applied: one line naming the file, the line and the key."""

    def __init__(self, file: str, line: int, path: Path, message: str) -> None:
        self.file, self.line, self.path, self.message = file, line, path, message
        where = f"{'.'.join(path)}: " if path else ""
        super().__init__(f"{file}:{line}: {where}{message}")


# --- the format: pydantic models, strict, unknown keys refused -------------------------------------


def _rule(check: Callable[[Any], object]) -> Callable[[Any], Any]:
    """A rule of ``rules.py`` as a pydantic validator: its BadInput becomes the error's message."""

    def run(value: Any) -> Any:
        try:
            check(value)
        except BadInput as exc:
            raise PydanticCustomError("rule", "{reason}", {"reason": str(exc)}) from None
        return value

    return run


def _scale(value: Any) -> Any:
    try:
        rules.check_scale(ServiceType.code, value)
    except BadInput:
        raise PydanticCustomError("rule", "{reason}", {
            "reason": f"must be an integer from 0 to {rules.MAX_SCALE}, not {value!r}"}) from None
    return value


def _type(value: Any) -> Any:
    try:
        return ServiceType(value)
    except ValueError:
        known = ", ".join(t.value for t in ServiceType)
        raise PydanticCustomError("rule", "{reason}", {
            "reason": f"unknown service type {value!r}: one of {known}"}) from None


def _short(key: str) -> Callable[[Any], Any]:
    """``name: text`` is short for ``name: {key: text}``."""
    return lambda value: {key: value} if isinstance(value, str) else value


def _health_path(value: Any) -> Any:
    if isinstance(value, str) and value:
        rules.check_health_path(value)
    return value


ServiceName = Annotated[str, AfterValidator(_rule(lambda v: rules.check_name("service", v)))]
TargetName = Annotated[str, AfterValidator(_rule(lambda v: rules.check_name("worker target", v)))]
EnvName = Annotated[str, AfterValidator(_rule(lambda v: rules.check_name("environment", v)))]
SiteName = Annotated[str, AfterValidator(_rule(rules.check_site_name))]
VariableName = Annotated[str, AfterValidator(_rule(lambda v: rules.check_variables({v: ""})))]
VariableValue = Annotated[str, AfterValidator(_rule(lambda v: rules.check_variables({"V": v})))]
ScaleValue = Annotated[int, BeforeValidator(_scale)]
Type = Annotated[ServiceType, BeforeValidator(_type)]
Image = Annotated[str, AfterValidator(_rule(rules.check_image_reference))]
Size = Annotated[str, AfterValidator(_rule(rules.check_size))]
Overlap = Annotated[int, BeforeValidator(_rule(rules.check_overlap))]
HealthPath = Annotated[str, AfterValidator(_rule(_health_path))]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class WorkerDecl(_Strict):
    command: str | None = None  # a new target without one: the current release's Procfile line
    scale: ScaleValue | None = None


class ServiceDecl(_Strict):
    type: Type
    image: Image | None = None
    command: str | None = None
    scale: ScaleValue | None = None
    size: Size | None = None
    variables: dict[VariableName, VariableValue | None] | None = None
    overlap: Overlap | None = None
    health_path: HealthPath | None = None
    workers: dict[TargetName, Annotated[WorkerDecl, BeforeValidator(_short("command"))]] | None = None

    def given(self, key: str) -> bool:
        """The key is in the file (a key left out leaves the service's setting as it is)."""
        return key in self.model_fields_set


class SiteDecl(_Strict):
    service: ServiceName
    cert: str | None = None  # file names, relative to the manifest's directory
    key: str | None = None


class ManifestFile(_Strict):
    environment: EnvName
    sandbox: bool | None = None
    services: dict[ServiceName, ServiceDecl] | None = None
    sites: dict[SiteName, Annotated[SiteDecl, BeforeValidator(_short("service"))]] | None = None


KNOWN_KEYS: dict[str, tuple[str, ...]] = {
    "top": tuple(ManifestFile.model_fields),
    "service": tuple(ServiceDecl.model_fields),
    "worker": tuple(WorkerDecl.model_fields),
    "site": tuple(SiteDecl.model_fields),
}


@dataclass(frozen=True)
class Tls:
    """A site's certificate chain (as ``rules.check_certificate`` gives it back) and its key."""

    chain: str
    key: str = field(repr=False)

    @property
    def fingerprint(self) -> str:
        return tls_fingerprint(self.chain, self.key)


def tls_fingerprint(chain: str, key: str) -> str:
    """What tells two certificates (with their keys) apart, as kept in the catalogue."""
    return hashlib.sha256((chain.strip() + "\n" + key.strip() + "\n").encode()).hexdigest()


@dataclass(frozen=True)
class Manifest:
    """A validated manifest: what the file says, where each key is, the sites' TLS files read."""

    file: str
    data: ManifestFile
    lines: Mapping[Path, int]
    tls: Mapping[str, Tls] = field(default_factory=dict, repr=False)

    @property
    def environment(self) -> str:
        return self.data.environment

    @property
    def services(self) -> dict[str, ServiceDecl]:
        return self.data.services or {}

    @property
    def sites(self) -> dict[str, SiteDecl]:
        return {rules.check_site_name(name): site for name, site in (self.data.sites or {}).items()}

    def line(self, path: Iterable[object]) -> int:
        return _line_of(self.lines, path)

    def error(self, path: Iterable[object], message: str) -> ManifestError:
        where = tuple(str(p) for p in path if p != "[key]")
        return ManifestError(self.file, self.line(where), where, message)


# --- loading ----------------------------------------------------------------------------------------


def load(text: str, file: str, read: Callable[[str], str] | None = None) -> Manifest:
    """Parse and validate a manifest. ``read`` gives a certificate or key file's text by the name
    the manifest uses (relative to its directory); without it, TLS sites are refused. Raises
    ManifestError (a BadInput): the first error, with its line."""
    lines: dict[Path, int] = {}
    raw = _parse_yaml(text, file, lines)
    if not isinstance(raw, dict):
        raise ManifestError(file, 1, (), "a manifest is a mapping: environment, sandbox, services, sites")
    try:
        data = ManifestFile.model_validate(raw)
    except ValidationError as exc:
        first, *more = sorted(exc.errors(), key=lambda e: _line_of(lines, e["loc"]))
        where = tuple(str(p) for p in first["loc"] if p != "[key]")
        extra = f" (and {len(more)} more error{'s' if len(more) > 1 else ''})" if more else ""
        raise ManifestError(file, _line_of(lines, first["loc"]), where, _message(first) + extra) from None
    manifest = Manifest(file, data, lines)
    _check(manifest)
    return Manifest(file, data, lines, _read_tls(manifest, read))


def _line_of(lines: Mapping[Path, int], loc: Iterable[object]) -> int:
    """The line of the key at ``loc`` (a pydantic error's location, or a path), or of the nearest
    enclosing key that is in the file."""
    keys = tuple(str(p) for p in loc if p != "[key]")
    while keys:
        if keys in lines:
            return lines[keys]
        keys = keys[:-1]
    return 1


def _parse_yaml(text: str, file: str, lines: dict[Path, int]) -> object:
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        reason = " ".join(str(exc.problem or exc.context or "").split())
        raise ManifestError(file, mark.line + 1 if mark else 1, (), f"not valid YAML: {reason}") from None
    except yaml.YAMLError as exc:
        raise ManifestError(file, 1, (), f"not valid YAML: {' '.join(str(exc).split())}") from None
    if node is None:
        raise ManifestError(file, 1, (), "the file is empty: a manifest names its environment and services")
    budget = [MAX_NODES]
    return _python(node, (), file, lines, yaml.constructor.SafeConstructor(), budget)


def _python(node: Any, path: Path, file: str, lines: dict[Path, int], constructor: Any,
            budget: list[int]) -> object:
    """The node as plain data, recording the line of every key. Keys are taken as written (``on``
    and ``123`` are names, not a bool and a number); so are variables' values (``0755``, ``true``
    stay as typed), null being no value. A key given twice is refused."""
    budget[0] -= 1
    if budget[0] < 0:
        raise ManifestError(file, node.start_mark.line + 1, path, f"more than {MAX_NODES} values")
    if isinstance(node, yaml.MappingNode):
        try:
            constructor.flatten_mapping(node)  # << merge keys
        except yaml.YAMLError as exc:
            raise ManifestError(file, node.start_mark.line + 1, path, " ".join(str(exc).split())) from None
        out: dict[str, object] = {}
        for key_node, value_node in node.value:
            line = key_node.start_mark.line + 1
            if not isinstance(key_node, yaml.ScalarNode):
                raise ManifestError(file, line, path, "a key must be a plain name")
            key = str(key_node.value)
            if key in out:
                raise ManifestError(file, line, (*path, key),
                                    f"given twice (lines {lines[(*path, key)]} and {line})")
            lines[(*path, key)] = line
            out[key] = _python(value_node, (*path, key), file, lines, constructor, budget)
        return out
    if isinstance(node, yaml.SequenceNode):
        items = []
        for i, item in enumerate(node.value):
            lines.setdefault((*path, str(i)), item.start_mark.line + 1)
            items.append(_python(item, (*path, str(i)), file, lines, constructor, budget))
        return items
    if len(path) == 4 and path[0] == "services" and path[2] == "variables":
        return None if node.tag == "tag:yaml.org,2002:null" else str(node.value)
    try:
        return constructor.construct_object(node)
    except yaml.YAMLError as exc:
        raise ManifestError(file, node.start_mark.line + 1, path, " ".join(str(exc).split())) from None


_MESSAGES = {
    "missing": "is required",
    "string_type": "must be a string (quote it)",
    "bool_type": "must be true or false",
    "int_type": "must be a whole number",
    "dict_type": "must be a mapping (key: value lines)",
    "model_type": "must be a mapping (key: value lines)",
}


def _message(error: Any) -> str:
    kind = error["type"]
    if kind == "extra_forbidden":
        return f"unknown key; known keys here: {', '.join(_known(tuple(error['loc'])))}"
    if kind in _MESSAGES:
        return _MESSAGES[kind]
    return str(error["msg"])


def _known(loc: tuple[object, ...]) -> tuple[str, ...]:
    if len(loc) == 3 and loc[0] == "services":
        return KNOWN_KEYS["service"]
    if len(loc) == 5 and loc[0] == "services":
        return KNOWN_KEYS["worker"]
    if len(loc) == 3 and loc[0] == "sites":
        return KNOWN_KEYS["site"]
    return KNOWN_KEYS["top"]


def _check(m: Manifest) -> None:
    """What one key's validator cannot see: keys that depend on the service's type, site names
    that are the same once in lower case, TLS files given in pairs."""
    for name, svc in m.services.items():
        where = ("services", name)
        profile = service_types.profile(svc.type)
        if svc.scale is not None and profile.single_job and svc.scale > 1:
            raise m.error((*where, "scale"), f"{svc.type} services run one job: the scale must be 0 or 1")
        if svc.type != ServiceType.code:
            for key in ("health_path", "workers"):
                if svc.given(key) and getattr(svc, key):
                    raise m.error((*where, key), f"{key} is for code services; {name} is a {svc.type} service")
            if svc.overlap:
                raise m.error((*where, "overlap"), f"an overlap is for code services; {name} is a {svc.type} service")
        try:
            rules.check_variables_total({k: v for k, v in (svc.variables or {}).items() if v is not None})
        except BadInput as exc:
            raise m.error((*where, "variables"), str(exc)) from None
    seen: dict[str, str] = {}
    for written, site in (m.data.sites or {}).items():
        name = rules.check_site_name(written)
        if name in seen:
            raise m.error(("sites", written), f"the same site as {seen[name]}")
        seen[name] = written
        if (site.cert is None) != (site.key is None):
            raise m.error(("sites", written), "a TLS site needs both cert and key (file names)")


def _read_tls(m: Manifest, read: Callable[[str], str] | None) -> dict[str, Tls]:
    found = {}
    for written, site in (m.data.sites or {}).items():
        if site.cert is None or site.key is None:
            continue
        texts = []
        for key, file in (("cert", site.cert), ("key", site.key)):
            if read is None:
                raise m.error(("sites", written, key), "certificate files cannot be read here")
            try:
                texts.append(read(file))
            except (OSError, UnicodeDecodeError, BadInput) as exc:
                reason = getattr(exc, "strerror", None) or str(exc)
                raise m.error(("sites", written, key), f"cannot read {file}: {reason}") from None
        name = rules.check_site_name(written)
        try:
            chain = rules.check_certificate(name, texts[0], texts[1])
        except BadInput as exc:
            raise m.error(("sites", written, "cert"), str(exc)) from None
        found[name] = Tls(chain, texts[1].strip() + "\n")
    return found


# --- the environment as it is ---------------------------------------------------------------------


@dataclass(frozen=True)
class WorkerState:
    command: str
    scale: int


@dataclass(frozen=True)
class ServiceState:
    """A service as the catalogue has it, its queued operations' changes included."""

    type: ServiceType
    image: str | None = None  # code services: the current release's (or a queued push's)
    command: str | None = None
    scale: int = 1
    size: str = "s"
    overlap: int = 0
    health_path: str | None = None
    redeployable: bool = True
    released: bool = False  # code services: pushed at least once (scale and workers need it)
    variables: Mapping[str, str] = field(default_factory=dict)
    workers: Mapping[str, WorkerState] = field(default_factory=dict)
    processes: Mapping[str, str] = field(default_factory=dict)  # the current release's Procfile
    busy: bool = False  # an operation of it is queued or runs


@dataclass(frozen=True)
class SiteState:
    service: str
    tls: str | None = None  # ``tls_fingerprint`` of its certificate and key


@dataclass(frozen=True)
class EnvState:
    name: str
    sandbox: bool
    services: Mapping[str, ServiceState] = field(default_factory=dict)
    sites: Mapping[str, SiteState] = field(default_factory=dict)
    removing: bool = False


def new_env(name: str, sandbox: bool, images: Mapping[ServiceType, str]) -> EnvState:
    """The environment ``create_env`` makes: its included services, deployed."""
    included = {i.name: ServiceState(type=i.type, image=images.get(i.type), command=i.command, size="xs")
                for i in service_types.INCLUDED_SERVICES if i.sandbox_too or not sandbox}
    return EnvState(name, sandbox, included)


# --- the changes ----------------------------------------------------------------------------------


def _q(text: str | None) -> str:
    return "none" if text is None else json.dumps(text)


@dataclass(frozen=True)
class CreateEnv:
    name: str
    sandbox: bool
    included: tuple[str, ...]

    def describe(self) -> str:
        kind = " (sandbox)" if self.sandbox else ""
        return f"+ create environment {self.name}{kind}, with {', '.join(self.included)}"


@dataclass(frozen=True)
class AddService:
    service: str
    type: ServiceType
    image: str | None
    command: str | None
    scale: int
    size: str

    def describe(self) -> str:
        image = f", image {self.image}" if self.image and self.type != ServiceType.code else ""
        command = f", command {_q(self.command)}" if self.command else ""
        deploys = "" if self.type == ServiceType.code else " (deploys now)"
        return (f"+ create service {self.service}: {self.type}{image}, scale {self.scale}, "
                f"size {self.size}{command}{deploys}")


@dataclass(frozen=True)
class UpdateService:
    """``command`` and ``health_path`` "" go back to none."""

    service: str
    shown: tuple[str, ...]
    image: str | None = None
    command: str | None = None
    size: str | None = None
    health_path: str | None = None
    overlap: int | None = None
    later: str = ""  # when it takes effect, if no redeploy of this plan does it

    def describe(self) -> str:
        return f"~ change service {self.service}: {', '.join(self.shown)}{self.later}"


@dataclass(frozen=True)
class SetVariables:
    service: str
    values: Mapping[str, str] = field(repr=False)
    later: str = ""

    def describe(self) -> str:  # names only: values may be secrets
        return f"~ set variables of {self.service}: {', '.join(self.values)}{self.later}"


@dataclass(frozen=True)
class UnsetVariables:
    service: str
    keys: tuple[str, ...]
    later: str = ""

    def describe(self) -> str:
        return f"~ unset variables of {self.service}: {', '.join(self.keys)}{self.later}"


@dataclass(frozen=True)
class RecordScale:
    """A code service before its first push runs nothing: its scale is recorded, no operation."""

    service: str
    scale: int
    before: int

    def describe(self) -> str:
        return f"~ change service {self.service}: scale {self.before} -> {self.scale} (its first push starts them)"


@dataclass(frozen=True)
class Scale:
    service: str
    scale: int
    before: int

    def describe(self) -> str:
        return f"~ scale {self.service}: {self.before} -> {self.scale}"


@dataclass(frozen=True)
class Push:
    service: str
    image: str
    before: str | None
    first: bool

    def describe(self) -> str:
        if self.first:
            return f"! push {self.image} to {self.service}: its first release (deploys it)"
        return f"! push {self.image} to {self.service}: a new release, was {self.before or '-'} (redeploys it)"


@dataclass(frozen=True)
class Redeploy:
    service: str
    reasons: tuple[str, ...]

    def describe(self) -> str:
        return f"! redeploy {self.service}: {', '.join(self.reasons)} changed"


@dataclass(frozen=True)
class DeployWorker:
    service: str
    target: str
    command: str | None  # None: the current release's Procfile line
    before: str | None  # None: a new target

    def describe(self) -> str:
        shown = _q(self.command) if self.command is not None else "its Procfile line"
        if self.before is None:
            return f"+ create worker target {self.service}/{self.target}: command {shown} (deploys it)"
        return (f"~ change worker target {self.service}/{self.target}: command {_q(self.before)} -> {shown} "
                "(its jobs are replaced)")


@dataclass(frozen=True)
class ScaleWorker:
    service: str
    target: str
    scale: int
    before: int

    def describe(self) -> str:
        return f"~ scale worker target {self.service}/{self.target}: {self.before} -> {self.scale}"


@dataclass(frozen=True)
class RemoveWorker:
    service: str
    target: str

    def describe(self) -> str:
        return f"- remove worker target {self.service}/{self.target} (not in the file)"


@dataclass(frozen=True)
class RemoveService:
    service: str

    def describe(self) -> str:
        return f"- remove service {self.service} (not in the file)"


@dataclass(frozen=True)
class AddSite:
    site: str
    service: str
    tls: Tls | None = field(default=None, repr=False)

    def describe(self) -> str:
        return f"+ create site {self.site} -> {self.service}" + (" (HTTPS too)" if self.tls else "")


@dataclass(frozen=True)
class ChangeSite:
    """No request changes a site in place: it is removed and added again."""

    site: str
    service: str
    shown: tuple[str, ...]
    tls: Tls | None = field(default=None, repr=False)

    def describe(self) -> str:
        return f"~ change site {self.site}: {', '.join(self.shown)} (removed, then added again)"


@dataclass(frozen=True)
class RemoveSite:
    site: str

    def describe(self) -> str:
        return f"- remove site {self.site} (not in the file)"


Change = (CreateEnv | AddService | UpdateService | SetVariables | UnsetVariables | RecordScale | Scale | Push
          | Redeploy | DeployWorker | ScaleWorker | RemoveWorker | RemoveService | AddSite | ChangeSite
          | RemoveSite)


@dataclass(frozen=True)
class Plan:
    environment: str
    changes: tuple[Change, ...]
    notes: tuple[str, ...] = ()  # what is left alone or must wait: nothing is done about it

    def lines(self) -> list[str]:
        return [c.describe() for c in self.changes] + [f"# {n}" for n in self.notes]


# --- the diff -------------------------------------------------------------------------------------


def diff(m: Manifest, current: EnvState | None, *, prune: bool = False, support: bool = False,
         included_images: Mapping[ServiceType, str] | None = None) -> Plan:
    """The changes that bring the environment (``current``; None: it does not exist) to what
    the manifest declares, in the order to make them: the environment, databases and caches,
    code services, sites, then (with ``prune``) the services the file leaves out. Keys the file
    leaves out leave the setting as it is. Raises ManifestError for a change that cannot be
    made, before anything is changed."""
    changes: list[Change] = []
    notes: list[str] = []
    if current is None:
        sandbox = bool(m.data.sandbox)
        current = new_env(m.environment, sandbox, included_images or {})
        changes.append(CreateEnv(m.environment, sandbox, tuple(current.services)))
    else:
        if current.removing:
            raise m.error(("environment",), f"environment {m.environment} is being removed")
        if m.data.sandbox is not None and m.data.sandbox != current.sandbox:
            was = "a sandbox" if current.sandbox else "not a sandbox"
            raise m.error(("sandbox",), f"environment {m.environment} is {was}: that cannot change")
    pruned = _pruned(m, current, prune, notes)
    _check_types(m, current, pruned)
    code_last = sorted(m.services.items(), key=lambda item: item[1].type == ServiceType.code)
    for name, decl in code_last:
        have = current.services.get(name)
        if have is None:
            changes += _new_service(m, name, decl, support, notes)
        else:
            changes += _service(m, name, decl, have, prune=prune, support=support, notes=notes)
    changes += _sites(m, current, pruned, prune, notes)
    changes += [RemoveService(name) for name in pruned]
    return Plan(m.environment, tuple(changes), tuple(notes))


def _pruned(m: Manifest, current: EnvState, prune: bool, notes: list[str]) -> list[str]:
    """The services the file leaves out (never an included one): removed with ``prune``."""
    left_out = [n for n, s in current.services.items() if n not in m.services and s.type not in INCLUDED_TYPES]
    if not prune:
        notes += [f"service {n} is not in the file: left alone (--prune removes it)" for n in left_out]
        return []
    for name in left_out:
        if current.services[name].busy:
            raise m.error(("services",), f"--prune removes service {name}, which has an operation queued or "
                                         "running: wait for it to end")
    return left_out


def _check_types(m: Manifest, current: EnvState, pruned: list[str]) -> None:
    """Types never change; no two services may set the same connection variable."""
    kinds = {n: s.type for n, s in current.services.items() if n not in pruned}
    for name, decl in m.services.items():
        have = current.services.get(name)
        if have is not None and have.type != decl.type:
            raise m.error(("services", name, "type"), f"{name} is a {have.type} service: a type cannot change "
                                                      "(remove the service to replace it)")
        if have is None:
            clashes = service_types.connection_clashes([*kinds.items(), (name, decl.type)])
            if clashes:
                raise m.error(("services", name), f"{clashes[0]}: one would shadow the other in code services")
        kinds[name] = decl.type
    for written, site in (m.data.sites or {}).items():
        kind = kinds.get(site.service)
        if kind is None:
            raise m.error(("sites", written, "service"), f"no service {site.service} in the file or the environment")
        if kind != ServiceType.code:
            raise m.error(("sites", written, "service"),
                          f"sites route to code services; {site.service} is a {kind} service")


def _redeploy_allowed(m: Manifest, path: Path, name: str, have: ServiceState, support: bool) -> None:
    if not service_types.profile(have.type).user_redeploy:
        raise m.error(path, f"{have.type} services cannot be redeployed, so this cannot change")
    if not have.redeployable and not support:
        raise m.error(path, f"service {name} is marked not redeployable: only support may redeploy it "
                            "(apply --support)")


def _new_service(m: Manifest, name: str, decl: ServiceDecl, support: bool, notes: list[str]) -> list[Change]:
    where = ("services", name)
    code = decl.type == ServiceType.code
    image = decl.image or service_types.profile(decl.type).default_image
    if not code and not image:
        raise m.error((*where, "image"), f"a {decl.type} service needs an image")
    command = decl.command if decl.command and decl.command.strip() else None
    out: list[Change] = [AddService(name, decl.type, None if code else image, command,
                                    decl.scale if decl.scale is not None else 1, decl.size or "s")]
    shown, updates = [], {}
    if decl.health_path:
        shown.append(f"health_path {_q(decl.health_path)}")
        updates["health_path"] = decl.health_path
    if decl.overlap:
        if not support:
            raise m.error((*where, "overlap"), "only support may set the overlap period (apply --support)")
        shown.append(f"overlap {decl.overlap}")
    if shown:
        out.append(UpdateService(name, tuple(shown), overlap=decl.overlap or None, **updates))
    values = {k: v for k, v in (decl.variables or {}).items() if v is not None}
    if values:
        out.append(SetVariables(name, values))
        if not code:  # it deployed when it was added
            state = ServiceState(type=decl.type)
            _redeploy_allowed(m, (*where, "variables"), name, state, support)
            out.append(Redeploy(name, ("variables",)))
    if code and decl.image:
        out.append(Push(name, decl.image, None, first=True))
    if code and decl.workers:
        out += _workers(m, name, decl, ServiceState(type=decl.type), pushed=decl.image is not None,
                        prune=False, notes=notes)
    if code and not decl.image:
        notes.append(f"service {name} runs nothing until its first push (services.{name}.image, or "
                     "`orchestrator push`)")
    return out


def _service(m: Manifest, name: str, decl: ServiceDecl, have: ServiceState, *, prune: bool, support: bool,
             notes: list[str]) -> list[Change]:
    where = ("services", name)
    code = have.type == ServiceType.code
    runs = have.released or not code
    shown: list[str] = []
    updates: dict[str, Any] = {}
    reasons: dict[str, Path] = {}  # what makes a redeploy needed, and where it is in the file

    push = None
    if decl.image is not None and decl.image != have.image:
        if code:
            push = Push(name, decl.image, have.image, first=not have.released)
            _redeploy_allowed(m, (*where, "image"), name, have, support)
        else:
            shown.append(f"image {have.image or '-'} -> {decl.image}")
            updates["image"] = decl.image
            reasons["image"] = (*where, "image")
    if decl.given("command"):
        command = decl.command if decl.command and decl.command.strip() else None
        if command != have.command:
            shown.append(f"command {_q(have.command)} -> {_q(command)}")
            updates["command"] = command or ""
            reasons["command"] = (*where, "command")
    if decl.size is not None and decl.size != have.size:
        shown.append(f"size {have.size} -> {decl.size}")
        updates["size"] = decl.size
        reasons["size"] = (*where, "size")
    if decl.given("health_path"):
        path = decl.health_path or None
        if path != have.health_path:
            shown.append(f"health_path {_q(have.health_path)} -> {_q(path)}")
            updates["health_path"] = path or ""
            reasons["health_path"] = (*where, "health_path")
    if decl.overlap is not None and decl.overlap != have.overlap:
        if not support:
            raise m.error((*where, "overlap"), "only support may set the overlap period (apply --support)")
        shown.append(f"overlap {have.overlap} -> {decl.overlap}")
        updates["overlap"] = decl.overlap

    declared = decl.variables or {}
    values = {k: v for k, v in declared.items() if v is not None and have.variables.get(k) != v}
    unset = [k for k, v in declared.items() if v is None and k in have.variables]
    left_out = [k for k in have.variables if k not in declared]
    if prune:
        unset += left_out
    elif left_out:
        notes.append(f"variables of {name} not in the file: {', '.join(left_out)}: left alone "
                     "(--prune unsets them)")
    final = {k: v for k, v in {**have.variables, **values}.items() if k not in unset}
    try:
        rules.check_variables_total(final)
    except BadInput as exc:
        raise m.error((*where, "variables"), str(exc)) from None
    if values or unset:
        reasons["variables"] = (*where, "variables")

    redeploy = bool(reasons) and runs and push is None
    if redeploy:
        _redeploy_allowed(m, next(iter(reasons.values())), name, have, support)
    later = "" if runs else " (its first push takes it)"
    out: list[Change] = []
    if shown:
        out.append(UpdateService(name, tuple(shown), later=later if reasons else "", **updates))
    if unset:
        out.append(UnsetVariables(name, tuple(unset), later=later))
    if values:
        out.append(SetVariables(name, values, later=later))
    scale = decl.scale if decl.scale is not None and decl.scale != have.scale else None
    if scale is not None and not have.released and code:
        out.append(RecordScale(name, scale, have.scale))
        scale = None
    if scale is not None and scale < have.scale:
        out.append(Scale(name, scale, have.scale))  # fewer jobs to replace
    if push is not None:
        out.append(push)
    elif redeploy:
        out.append(Redeploy(name, tuple(reasons)))
    if scale is not None and scale > have.scale:
        out.append(Scale(name, scale, have.scale))  # the new jobs start with the new spec
    if code:
        out += _workers(m, name, decl, have, pushed=push is not None, prune=prune, notes=notes)
    return out


def _workers(m: Manifest, name: str, decl: ServiceDecl, have: ServiceState, *, pushed: bool, prune: bool,
             notes: list[str]) -> list[Change]:
    where = ("services", name, "workers")
    declared = decl.workers or {}
    out: list[Change] = []
    for target, w in declared.items():
        command = w.command if w.command and w.command.strip() else None
        existing = have.workers.get(target)
        if existing is None:
            if not (have.released or pushed):
                notes.append(f"worker target {name}/{target} waits for {name}'s first push: apply again after it")
                continue
            procfile = None if pushed else have.processes.get(target)
            if command is None and not procfile:
                raise m.error((*where, target, "command"),
                              f"a new worker target needs a command ({name}'s release has no Procfile line {target})")
            out.append(DeployWorker(name, target, command, None))
            if w.scale is not None and w.scale != 1:
                out.append(ScaleWorker(name, target, w.scale, 1))
            continue
        if command is not None and command != existing.command:
            out.append(DeployWorker(name, target, command, existing.command))
        if w.scale is not None and w.scale != existing.scale:
            out.append(ScaleWorker(name, target, w.scale, existing.scale))
    left_out = [t for t in have.workers if t not in declared]
    if prune:
        out += [RemoveWorker(name, t) for t in left_out]
    elif left_out:
        notes += [f"worker target {name}/{t} is not in the file: left alone (--prune removes it)" for t in left_out]
    return out


def _sites(m: Manifest, current: EnvState, pruned: list[str], prune: bool, notes: list[str]) -> list[Change]:
    out: list[Change] = []
    declared = m.sites
    for site, have in current.sites.items():
        if site in declared:
            continue
        if prune or have.service in pruned:
            out.append(RemoveSite(site))
        else:
            notes.append(f"site {site} is not in the file: left alone (--prune removes it)")
    for site, decl in declared.items():
        tls = m.tls.get(site)
        existing = current.sites.get(site)
        if existing is None:
            out.append(AddSite(site, decl.service, tls))
            continue
        shown = []
        if existing.service != decl.service:
            shown.append(f"service {existing.service} -> {decl.service}")
        wanted = tls.fingerprint if tls else None
        if wanted != existing.tls:
            shown.append("certificate " + ("added" if existing.tls is None else "removed" if tls is None
                                           else "replaced"))
        if shown:
            out.append(ChangeSite(site, decl.service, tuple(shown), tls))
    return out
