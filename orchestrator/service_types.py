"""What each service type means for its jobs: default image, credentials, data volume, port flags
and the connection variables code services get. Pure: data in, data out."""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from orchestrator.models import ServiceType


@dataclass(frozen=True)
class TypeProfile:
    default_image: str | None = None
    data_dir: str | None = None  # a named volume is mounted here and survives redeploys
    single_job: bool = False  # scale above 1 is refused (one copy of the data, one kept port)
    stable_port: bool = False  # every job of the service gets the same port
    deploys_on_create: bool = True
    has_port: bool = True  # False: its deploy jobs get no PORT (nothing listens)
    user_redeploy: bool = True  # False: the CLI and API refuse a redeploy
    start_first: bool = False  # a redeploy starts the new jobs before it stops the old ones
    routed: bool = False  # its deploy jobs serve the environment's sites through the proxy
    args: tuple[str, ...] = ()  # flags for the image's entrypoint; {port} is the job's port
    # More ports a job holds after its PORT, by the variable that names each: the logging
    # service's PORT is its dashboard and API, PORT+1 (SYSLOG_PORT) its syslog (RELP) input.
    extra_ports: tuple[str, ...] = ()
    url_variable: str | None = None  # e.g. DATABASE_URL, for the env's code services
    secret_keys: frozenset[str] = field(default_factory=frozenset)


PROFILES: dict[ServiceType, TypeProfile] = {
    ServiceType.code: TypeProfile(deploys_on_create=False, routed=True),
    ServiceType.postgresql: TypeProfile(
        default_image="postgres:16", data_dir="/var/lib/postgresql/data", single_job=True,
        stable_port=True, args=("-p", "{port}"), url_variable="DATABASE_URL",
        secret_keys=frozenset({"POSTGRES_PASSWORD"}),
    ),
    ServiceType.mysql: TypeProfile(
        default_image="mysql:8.4", data_dir="/var/lib/mysql", single_job=True, stable_port=True,
        args=("--port={port}",), url_variable="DATABASE_URL",
        secret_keys=frozenset({"MYSQL_PASSWORD", "MYSQL_ROOT_PASSWORD"}),
    ),
    ServiceType.redis: TypeProfile(
        default_image="redis:7", single_job=True, stable_port=True, url_variable="REDIS_URL",
        # The password goes in through the environment and a 0600 file, never argv (ps shows it).
        args=("sh", "-c", 'umask 077 && printf "requirepass %s\\n" "$REDIS_PASSWORD" > /tmp/redis.conf'
              ' && exec redis-server /tmp/redis.conf --port "$PORT"'),
    ),
    ServiceType.memcached: TypeProfile(
        default_image="memcached:1.6", single_job=True, stable_port=True, url_variable="MEMCACHED_URL",
        args=("-p", "{port}"),
    ),
    # The proxy listens on its environment's ports, not on one of the job range; its new jobs
    # bind them beside the old ones (SO_REUSEPORT) before the old ones stop.
    ServiceType.service_proxy: TypeProfile(default_image=None, has_port=False, start_first=True),
    # One job holds the environment's log store (a volume on its host) and its stable ports,
    # which every host's log shipper sends to: they stay true across its redeploys.
    ServiceType.logging: TypeProfile(default_image=None, user_redeploy=False, data_dir="/var/lib/orch-logs",
                                     single_job=True, stable_port=True,
                                     extra_ports=("SYSLOG_PORT",)),
    # Prometheus (PORT: its UI, API and console pages) and its blackbox exporter (BLACKBOX_PORT),
    # its data in a volume; what it checks is in files its host's node keeps in line.
    ServiceType.monitoring: TypeProfile(default_image=None, user_redeploy=False, data_dir="/var/lib/orch-monitoring",
                                        single_job=True, stable_port=True, extra_ports=("BLACKBOX_PORT",)),
}

DATABASE_TYPES = frozenset({ServiceType.postgresql, ServiceType.mysql})


def ports_held(kind: ServiceType) -> int:
    """How many consecutive ports from its PORT a job of the type holds: its PORT and one per
    extra port. The type says so, not the variables a job has (they name the ports, no more)."""
    return 1 + len(PROFILES[kind].extra_ports)


def profile(kind: ServiceType) -> TypeProfile:
    return PROFILES[kind]


def new_credentials(kind: ServiceType, service: str) -> dict[str, str]:
    """Generated once, when the service is created, and kept by the platform."""
    name = service.replace("-", "_")
    if kind in DATABASE_TYPES:
        creds = {"user": "app", "password": secrets.token_urlsafe(18), "database": name}
        if kind == ServiceType.mysql:
            creds["root_password"] = secrets.token_urlsafe(18)
        return creds
    if kind == ServiceType.redis:
        return {"password": secrets.token_urlsafe(18)}
    if kind in (ServiceType.logging, ServiceType.monitoring):  # its dashboard and API (HTTP basic auth)
        return {"user": "admin", "password": secrets.token_urlsafe(18)}
    return {}


def container_variables(kind: ServiceType, creds: Mapping[str, str]) -> dict[str, str]:
    """The variables the type's own image reads (the official images' conventions)."""
    if kind == ServiceType.postgresql:
        return {"POSTGRES_USER": creds["user"], "POSTGRES_PASSWORD": creds["password"],
                "POSTGRES_DB": creds["database"]}
    if kind == ServiceType.mysql:
        return {"MYSQL_ROOT_PASSWORD": creds["root_password"], "MYSQL_USER": creds["user"],
                "MYSQL_PASSWORD": creds["password"], "MYSQL_DATABASE": creds["database"]}
    if kind == ServiceType.redis:
        return {"REDIS_PASSWORD": creds["password"]}
    if kind == ServiceType.logging and "password" in creds:
        return {"LOG_USER": creds["user"], "LOG_PASSWORD": creds["password"]}
    if kind == ServiceType.monitoring and "password" in creds:
        return {"MONITOR_USER": creds["user"], "MONITOR_PASSWORD": creds["password"]}
    return {}


def entrypoint_args(kind: ServiceType) -> tuple[str, ...]:
    """Arguments for the image's entrypoint, with {port} left for the planner to fill per job.
    Never a secret: those go in through the environment."""
    return PROFILES[kind].args


@dataclass(frozen=True)
class Endpoint:
    """A deployed database or cache, as a code service in the same environment sees it."""

    name: str
    type: ServiceType
    address: str
    port: int
    credentials: Mapping[str, str]


def connection_url(e: Endpoint) -> str:
    c = e.credentials
    if e.type == ServiceType.postgresql:
        return f"postgresql://{c['user']}:{c['password']}@{e.address}:{e.port}/{c['database']}"
    if e.type == ServiceType.mysql:
        return f"mysql://{c['user']}:{c['password']}@{e.address}:{e.port}/{c['database']}"
    if e.type == ServiceType.redis:
        return f"redis://:{c['password']}@{e.address}:{e.port}/0"
    return f"memcached://{e.address}:{e.port}"


def _claims(services: Iterable[tuple[str, ServiceType]]) -> list[tuple[str, str, str]]:
    """(variable, service, what) for every connection variable the services set: <NAME>_URL for
    each, and DATABASE_URL, REDIS_URL, MEMCACHED_URL (+ MEMCACHE_SERVERS) for the first service
    of each kind, by name."""
    claims: list[tuple[str, str, str]] = []
    generic_owned: set[str] = set()
    for name, kind in sorted(services):
        claims.append((f"{name.upper().replace('-', '_')}_URL", name, "url"))
        generic = PROFILES[kind].url_variable
        if generic and generic not in generic_owned:
            generic_owned.add(generic)
            claims.append((generic, name, "url"))
            if kind == ServiceType.memcached:
                claims.append(("MEMCACHE_SERVERS", name, "servers"))
    return claims


def connection_clashes(services: Iterable[tuple[str, ServiceType]]) -> list[str]:
    """Connection variables two services would both set (one would shadow the other), in words."""
    services = [(n, k) for n, k in services if PROFILES[k].url_variable]
    owners: dict[str, str] = {}
    clashes = []
    for variable, name, _ in _claims(services):
        if owners.setdefault(variable, name) != name:
            clashes.append(f"services {owners[variable]} and {name} would both set {variable}")
    return clashes


def connection_variables(endpoints: Iterable[Endpoint]) -> dict[str, str]:
    """The variables code services get to reach the environment's databases and caches: e.g. a
    postgresql service "orders-db" gives ORDERS_DB_URL, and DATABASE_URL if it is the first."""
    by_name = {e.name: e for e in endpoints}
    variables = {}
    for variable, name, what in _claims((e.name, e.type) for e in by_name.values()):
        e = by_name[name]
        variables[variable] = connection_url(e) if what == "url" else f"{e.address}:{e.port}"
    return variables


def is_secret(name: str, value: str) -> bool:
    upper = name.upper()
    return any(w in upper for w in ("PASSWORD", "SECRET", "TOKEN", "KEY")) or (
        "://" in value and "@" in value.split("://", 1)[1]
    )


def mask(value: str) -> str:
    if "://" in value and "@" in value:
        scheme, rest = value.split("://", 1)
        userinfo, host = rest.rsplit("@", 1)
        user = userinfo.split(":", 1)[0]
        return f"{scheme}://{user}:*****@{host}"
    return "*****"


@dataclass(frozen=True)
class IncludedService:
    """A service every environment gets (monitoring: every non-sandbox one)."""

    name: str
    type: ServiceType
    command: str | None  # None: the image's own entrypoint
    sandbox_too: bool = True


INCLUDED_SERVICES = (
    IncludedService("logging", ServiceType.logging, None),
    IncludedService("service-proxy", ServiceType.service_proxy, None),
    IncludedService("monitoring", ServiceType.monitoring, None, sandbox_too=False),
)
