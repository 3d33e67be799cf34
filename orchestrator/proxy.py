"""PURE: what an environment's service proxy (HAProxy) serves, and the files that say it.

``ProxyConfig`` is the wanted state: one backend per code service (its deploy jobs that serve
or drain), the sites that route host names to them, and the TLS sites' certificates. ``render``
turns it into HAProxy's files; a node writes them into the proxy job's directory and applies
the difference through HAProxy's runtime API (``workers.proxy``). The files always say the whole
state, so a proxy that restarts or reloads comes back with the same servers and sites.

What the runtime API cannot change (a new backend, a health path, a certificate) is the
"static" part: when it changes, the node reloads HAProxy through its master socket (hitless:
the old worker finishes its connections). Servers and site maps change in place.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass

CONTAINER_DIR = "/run/orch-proxy"  # where the proxy job sees its directory
CONFIG_FILE = "haproxy.cfg"
SITES_MAP = "sites.map"  # host name -> backend, on the HTTP port (every site)
TLS_MAP = "tls.map"  # host name -> backend, on the HTTPS port (sites with a certificate)
CERT_LIST = "certs.list"
DEFAULT_CERT = "default.pem"  # served to a client that names no known site (then: 404)
ADMIN_SOCKET = "admin.sock"  # the runtime API (level admin, mode 600)
MASTER_SOCKET = "master.sock"  # the master CLI: reload
NO_SITE = "no-site"  # the backend that answers 404
CHECK = "check inter 500 rise 1 fall 2"  # how every server is checked (dynamic ones too)


@dataclass(frozen=True)
class Server:
    """A deploy job of a code service, as the proxy sends it requests."""

    name: str  # the job id: unique, so a replacement is a new server (no reused names)
    address: str
    port: int
    draining: bool = False  # no new requests; those in flight finish


@dataclass(frozen=True)
class Backend:
    service: str
    health_path: str | None  # HTTP GET must answer 2xx/3xx; None: a TCP connect
    servers: tuple[Server, ...] = ()

    @property
    def name(self) -> str:
        return backend_name(self.service)


@dataclass(frozen=True)
class Site:
    name: str
    service: str
    pem: str | None = None  # certificate chain and key (TLS sites), a secret


@dataclass(frozen=True)
class ProxyConfig:
    bind: str  # the host's address
    http_port: int
    https_port: int
    backends: tuple[Backend, ...] = ()
    sites: tuple[Site, ...] = ()


def backend_name(service: str) -> str:
    return f"svc-{service}"


def in_container(name: str) -> str:
    return f"{CONTAINER_DIR}/{name}"


def cert_file(site: str) -> str:
    return f"certs/{site}.pem"


def server_line(server: Server) -> str:
    """The server as ``add server`` takes it, and as the config file lists it."""
    weight = " weight 0" if server.draining else ""
    return f"{server.address}:{server.port} {CHECK}{weight}"


def _backend_block(b: Backend, with_servers: bool) -> list[str]:
    lines = [f"backend {b.name}", "    balance roundrobin"]
    if b.health_path:
        lines += [f"    option httpchk GET {b.health_path}", "    http-check expect status 200-399"]
    if with_servers:
        lines += [f"    server {s.name} {server_line(s)}" for s in b.servers]
    return lines


def _config(c: ProxyConfig, with_servers: bool) -> str:
    tls = any(s.pem for s in c.sites)
    lines = [
        "# Written by the platform: every change goes through it (`orchestrator sites`, redeploys).",
        "global",
        f"    stats socket {in_container(ADMIN_SOCKET)} mode 600 level admin expose-fd listeners",
        "    stats timeout 30s",
        "    hard-stop-after 30s",
        "defaults",
        "    mode http",
        "    timeout connect 3s",
        "    timeout client 30s",
        "    timeout server 30s",
        "    timeout http-request 10s",
        "    timeout http-keep-alive 5s",
        "    retries 3",
        "    option redispatch 1",
        "    retry-on conn-failure empty-response",
        "frontend http",
        f"    bind {c.bind}:{c.http_port}",
        f"    use_backend %[req.hdr(host),field(1,:),lower,map({in_container(SITES_MAP)},{NO_SITE})]",
        f"    default_backend {NO_SITE}",
        "frontend https",
        f"    bind {c.bind}:{c.https_port} ssl crt {in_container(DEFAULT_CERT)}"
        + (f" crt-list {in_container(CERT_LIST)}" if tls else ""),
        f"    use_backend %[req.hdr(host),field(1,:),lower,map({in_container(TLS_MAP)},{NO_SITE})]",
        f"    default_backend {NO_SITE}",
        f"backend {NO_SITE}",
        '    http-request return status 404 content-type text/plain string "no such site"',
    ]
    for b in sorted(c.backends, key=lambda b: b.service):
        lines += _backend_block(b, with_servers)
    return "\n".join(lines) + "\n"


def render(c: ProxyConfig) -> dict[str, str]:
    """Every file of the proxy's directory but the default certificate: relative path -> text."""
    sites = sorted(c.sites, key=lambda s: s.name)
    files = {
        CONFIG_FILE: _config(c, with_servers=True),
        SITES_MAP: "".join(f"{s.name} {backend_name(s.service)}\n" for s in sites),
        TLS_MAP: "".join(f"{s.name} {backend_name(s.service)}\n" for s in sites if s.pem),
        CERT_LIST: "".join(f"{in_container(cert_file(s.name))} {s.name}\n" for s in sites if s.pem),
    }
    for s in sites:
        if s.pem:
            files[cert_file(s.name)] = s.pem
    return files


def static_key(c: ProxyConfig) -> str:
    """A hash of what only a reload changes: the config without its servers, and the
    certificates. Equal keys: the runtime API can take the proxy from one state to the other."""
    digest = hashlib.sha256(_config(c, with_servers=False).encode())
    for s in sorted(c.sites, key=lambda s: s.name):
        if s.pem:
            digest.update(f"{s.name}\0{s.pem}\0".encode())
    return digest.hexdigest()[:16]


def map_entries(c: ProxyConfig, *, tls: bool) -> dict[str, str]:
    """Host name -> backend of one of the two maps."""
    return {s.name: backend_name(s.service) for s in c.sites if s.pem or not tls}


def wanted_servers(c: ProxyConfig) -> Mapping[str, Mapping[str, Server]]:
    """Backend name -> server name -> server."""
    return {b.name: {s.name: s for s in b.servers} for b in c.backends}
