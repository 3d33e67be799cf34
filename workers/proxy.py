"""A node's service proxies: HAProxy jobs on this host, driven through their runtime API.

Each proxy job has a directory on the host (``Settings.proxy_dir``/JOB), mounted into its
container: the node writes the configuration, site maps and certificates there (always the
whole wanted state, ``orchestrator.proxy.render``), and HAProxy makes its sockets there. To
change a running proxy the node first writes the files, then either changes the servers and
maps in place through the admin socket, or, when what changed cannot be changed in place (a new
backend, a health path, a certificate), reloads it through the master socket (hitless: the old
worker finishes its connections).

``HAProxyDriver`` is the real thing; ``MemoryProxies`` is its in-memory twin for unit tests.
"""

from __future__ import annotations

import logging
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from orchestrator import catalogue, proxy
from orchestrator.platform import Platform
from orchestrator.proxy import ProxyConfig
from workers.files import write_whole

log = logging.getLogger(__name__)

STATE_KEY_FILE = ".static-key"  # the static key of the configuration the proxy last loaded
SOCKET_TIMEOUT = 5.0
# Seconds HAProxy's master CLI may refuse connections (its socket there, nobody accepting): while
# the master runs a reload asked a moment before (the heartbeat's, or another step's), or starts.
MASTER_BUSY_FOR = 3.0


class ProxyError(Exception):
    """The proxy did not take a change; the message says why in one line."""


@dataclass(frozen=True)
class ServerState:
    backend: str
    name: str
    address: str
    port: int
    running: bool  # operational state: the server takes traffic (its last checks passed)
    passed: bool  # the last health check passed
    drained: bool  # drain or maintenance (admin state)
    sessions: int = 0


class ProxyDriver(Protocol):
    def prepare(self, job_id: str, config: ProxyConfig) -> dict[str, str]:
        """Write the job's files before its container starts; returns its mounts
        (host directory -> path in the container)."""

    def ready(self, job_id: str) -> bool:
        """Whether the job's HAProxy answers on its admin socket."""

    def apply(self, job_id: str, wanted: Callable[[], ProxyConfig], *, drain_timeout: float = 0.0,
              wait: bool = True) -> bool:
        """Bring the running proxy to ``wanted()`` (read under the job's lock, so concurrent
        changes never undo each other): files first, then in place or by a reload. Servers that
        leave are drained (at most ``drain_timeout`` s) before they go. Without ``wait``, does
        nothing and returns False while another change runs."""

    def servers(self, job_id: str) -> list[ServerState]:
        """The servers the running proxy has, with their checks."""

    def remove(self, job_id: str) -> None:
        """Forget a stopped proxy job's files."""


def wanted(platform: Platform, env_name: str, bind: str) -> Callable[[], ProxyConfig]:
    """What a proxy job of environment ``env_name`` listening on ``bind`` must serve, read from
    the catalogue when called."""

    def read() -> ProxyConfig:
        with platform.reader() as s:
            env = catalogue.get_env(session=s, name=env_name)
            return catalogue.proxy_config(session=s, env=env, bind=bind)

    return read


def parse_servers_state(text: str) -> list[ServerState]:
    """``show servers state``: one line per server after a version line and a header."""
    found = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 19 or line.startswith("#"):
            continue
        admin = int(parts[6])
        found.append(ServerState(
            backend=parts[1], name=parts[3], address=parts[4], port=int(parts[18]),
            running=parts[5] == "2", passed=parts[11] in ("3", "4"),
            drained=bool(admin & 0x7F) or parts[7] == "0",  # maint/drain flags, or weight 0
        ))
    return found


def parse_sessions(text: str) -> dict[tuple[str, str], int]:
    """``show stat`` CSV: (backend, server) -> current sessions."""
    found = {}
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        cells = line.split(",")
        if len(cells) > 4 and cells[1] not in ("FRONTEND", "BACKEND") and cells[4].isdigit():
            found[(cells[0], cells[1])] = int(cells[4])
    return found


def parse_map(text: str) -> dict[str, str]:
    """``show map``: ``ID KEY VALUE`` per entry."""
    entries = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 3:
            entries[parts[1]] = parts[2]
    return entries


def _ask_master(path: Path, command: str, busy_for: float = MASTER_BUSY_FOR) -> str:
    """``command`` on the master CLI, asked again while it refuses connections (for ``busy_for``
    seconds): a refused connection delivered nothing, so asking again does it once."""
    deadline = time.monotonic() + busy_for
    while True:
        try:
            return _ask(path, command, half_close=True)
        except (ConnectionRefusedError, FileNotFoundError):
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.05)


def _ask(path: Path, command: str, *, half_close: bool = False) -> str:
    """One command on a HAProxy socket (one connection each). The master CLI answers only after
    the client half-closes."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(SOCKET_TIMEOUT)
        sock.connect(str(path))
        sock.sendall(command.encode() + b"\n")
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        chunks = []
        while True:
            data = sock.recv(65536)
            if not data:
                break
            chunks.append(data)
    return b"".join(chunks).decode(errors="replace")


class HAProxyDriver:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self._locks: dict[str, threading.Lock] = {}
        self._locks_lock = threading.Lock()

    def directory(self, job_id: str) -> Path:
        return self.root / job_id

    def lock(self, job_id: str) -> threading.Lock:
        """One change at a time per proxy job (steps and the heartbeat's reconciliation)."""
        with self._locks_lock:
            return self._locks.setdefault(job_id, threading.Lock())

    def command(self, job_id: str, command: str) -> str:
        try:
            answer = _ask(self.directory(job_id) / proxy.ADMIN_SOCKET, command)
        except OSError as exc:
            raise ProxyError(f"proxy job {job_id} does not answer on its admin socket: {exc}") from exc
        said = " ".join(answer.split())
        # Changes answer nothing, or these; anything else is a refusal.
        if not command.startswith("show ") and said and not said.startswith(("New server registered",
                                                                             "Server deleted")):
            raise ProxyError(f"proxy job {job_id} refused `{command}`: {said[:200]}")
        return answer

    # --- files -----------------------------------------------------------------------------

    def _write(self, job_id: str, config: ProxyConfig) -> None:
        directory = self.directory(job_id)
        (directory / "certs").mkdir(parents=True, exist_ok=True, mode=0o700)
        directory.chmod(0o700)
        if not (directory / proxy.DEFAULT_CERT).exists():
            _atomic(directory / proxy.DEFAULT_CERT, default_certificate())
        files = proxy.render(config)
        for name, text in files.items():
            _atomic(directory / name, text)
        wanted = {proxy.cert_file(s.name) for s in config.sites if s.pem}
        for old in (directory / "certs").glob("*.pem"):
            if f"certs/{old.name}" not in wanted:
                old.unlink(missing_ok=True)

    def prepare(self, job_id: str, config: ProxyConfig) -> dict[str, str]:
        with self.lock(job_id):
            self._write(job_id, config)
            _atomic(self.directory(job_id) / STATE_KEY_FILE, proxy.static_key(config))
        return {str(self.directory(job_id)): proxy.CONTAINER_DIR}

    def ready(self, job_id: str) -> bool:
        try:
            return "Pid:" in _ask(self.directory(job_id) / proxy.ADMIN_SOCKET, "show info")
        except OSError:
            return False

    def remove(self, job_id: str) -> None:
        with self.lock(job_id):  # never under a change being written
            directory = self.directory(job_id)
            if directory.is_dir():
                shutil.rmtree(directory, ignore_errors=True)

    # --- the running proxy -----------------------------------------------------------------

    def servers(self, job_id: str) -> list[ServerState]:
        states = parse_servers_state(self.command(job_id, "show servers state"))
        sessions = parse_sessions(self.command(job_id, "show stat -1 4 -1"))
        return [ServerState(**{**s.__dict__, "sessions": sessions.get((s.backend, s.name), 0)})
                for s in states]

    def apply(self, job_id: str, wanted: Callable[[], ProxyConfig], *, drain_timeout: float = 0.0,
              wait: bool = True) -> bool:
        lock = self.lock(job_id)
        if not lock.acquire(blocking=wait):
            return False
        try:
            self._apply(job_id, wanted(), drain_timeout)
        finally:
            lock.release()
        return True

    def _apply(self, job_id: str, config: ProxyConfig, drain_timeout: float) -> None:
        self._write(job_id, config)
        key_file = self.directory(job_id) / STATE_KEY_FILE
        key = proxy.static_key(config)
        loaded = key_file.read_text() if key_file.exists() else ""
        if key != loaded:
            self._reload(job_id, config)
            _atomic(key_file, key)
            return
        self._servers_in_place(job_id, config, drain_timeout)
        self._maps_in_place(job_id, config)

    def _reload(self, job_id: str, config: ProxyConfig) -> None:
        """Hitless: the master starts a new worker on the files; the old one finishes."""
        before = self._worker_pid(job_id)
        try:
            _ask_master(self.directory(job_id) / proxy.MASTER_SOCKET, "reload")
        except OSError as exc:
            raise ProxyError(f"proxy job {job_id} does not answer on its master socket: {exc}") from exc
        wanted = {b.name for b in config.backends}
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            pid = self._worker_pid(job_id)
            if pid and pid != before:
                try:
                    have = {s.backend for s in self.servers(job_id)}
                    have |= set(self.command(job_id, "show backend").split())
                except ProxyError:
                    have = set()
                if wanted <= have:
                    return
            time.sleep(0.05)
        raise ProxyError(f"proxy job {job_id} did not come back from a reload within 15s "
                         "(see its container's log)")

    def _worker_pid(self, job_id: str) -> str | None:
        try:
            info = _ask(self.directory(job_id) / proxy.ADMIN_SOCKET, "show info")
        except OSError:
            return None
        return next((line.split(":", 1)[1].strip() for line in info.splitlines()
                     if line.startswith("Pid:")), None)

    def _servers_in_place(self, job_id: str, config: ProxyConfig, drain_timeout: float) -> None:
        wanted = proxy.wanted_servers(config)
        have: dict[tuple[str, str], ServerState] = {(s.backend, s.name): s for s in self.servers(job_id)}
        for backend, servers in wanted.items():
            for name, server in servers.items():
                current = have.get((backend, name))
                if current is None:
                    self.command(job_id, f"add server {backend}/{name} {proxy.server_line(server)}")
                    self.command(job_id, f"enable health {backend}/{name}")
                    if not server.draining:
                        self.command(job_id, f"enable server {backend}/{name}")
                elif server.draining and not current.drained:
                    self.command(job_id, f"set server {backend}/{name} state drain")
                elif not server.draining and current.drained:
                    self.command(job_id, f"set server {backend}/{name} state ready")
                    self.command(job_id, f"set weight {backend}/{name} 1")
        leaving = [s for key, s in have.items() if s.name not in wanted.get(key[0], {})]
        if not leaving:
            return
        for s in leaving:
            if not s.drained:
                self.command(job_id, f"set server {s.backend}/{s.name} state drain")
        if drain_timeout <= 0:
            # Not this caller's to wait for (the heartbeat, another service's step): servers
            # still busy are left draining; the step that takes them out waits for them.
            leaving = [s for s in leaving if s.sessions == 0]
        deadline = time.monotonic() + drain_timeout
        names = {(s.backend, s.name) for s in leaving}
        while time.monotonic() < deadline:
            busy = [s for s in self.servers(job_id) if (s.backend, s.name) in names and s.sessions]
            if not busy:
                break
            time.sleep(0.05)
        for s in leaving:
            self.command(job_id, f"set server {s.backend}/{s.name} state maint")
            self.command(job_id, f"shutdown sessions server {s.backend}/{s.name}")
            self._delete(job_id, s)

    def _delete(self, job_id: str, s: ServerState) -> None:
        """``del server`` refuses while connections are still being released: ask again."""
        deadline = time.monotonic() + 5
        while True:
            try:
                self.command(job_id, f"del server {s.backend}/{s.name}")
                return
            except ProxyError:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.1)

    def _maps_in_place(self, job_id: str, config: ProxyConfig) -> None:
        for name, tls in ((proxy.SITES_MAP, False), (proxy.TLS_MAP, True)):
            path = proxy.in_container(name)
            wanted = proxy.map_entries(config, tls=tls)
            have = parse_map(self.command(job_id, f"show map {path}"))
            for key in have.keys() - wanted.keys():
                self.command(job_id, f"del map {path} {key}")
            for key, value in wanted.items():
                if key not in have:
                    self.command(job_id, f"add map {path} {key} {value}")
                elif have[key] != value:
                    self.command(job_id, f"set map {path} {key} {value}")


def _atomic(path: Path, text: str) -> None:
    """Write a file whole, readable by its owner only (it may hold private keys)."""
    write_whole(path, text, mode=0o600)


def default_certificate() -> str:
    """A self-signed certificate for clients that name no known site (they then get 404)."""
    from datetime import UTC, datetime, timedelta

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "no-such-site.invalid")])
    now = datetime.now(UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(days=1)).not_valid_after(now + timedelta(days=3650))
            .sign(key, hashes.SHA256()))
    return (cert.public_bytes(serialization.Encoding.PEM).decode()
            + key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption()).decode())


@dataclass
class MemoryProxies:
    """The in-memory twin: a proxy job's wanted config is what it serves, and every server
    passes its check at once (or never, for addresses in ``failing``)."""

    configs: dict[str, ProxyConfig] = field(default_factory=dict)
    failing: set[int] = field(default_factory=set)  # ports whose servers never pass
    running: set[str] = field(default_factory=set)

    def prepare(self, job_id: str, config: ProxyConfig) -> dict[str, str]:
        self.configs[job_id] = config
        self.running.add(job_id)
        return {}

    def ready(self, job_id: str) -> bool:
        return job_id in self.running

    def apply(self, job_id: str, wanted: Callable[[], ProxyConfig], *, drain_timeout: float = 0.0,
              wait: bool = True) -> bool:
        if job_id not in self.running:
            raise ProxyError(f"proxy job {job_id} does not answer on its admin socket")
        self.configs[job_id] = wanted()
        return True

    def servers(self, job_id: str) -> list[ServerState]:
        config = self.configs.get(job_id)
        if config is None:
            return []
        return [ServerState(b.name, s.name, s.address, s.port, running=s.port not in self.failing,
                            passed=s.port not in self.failing, drained=s.draining)
                for b in config.backends for s in b.servers]

    def remove(self, job_id: str) -> None:
        self.configs.pop(job_id, None)
        self.running.discard(job_id)


def passed(states: Iterable[ServerState], names: Iterable[str]) -> set[str]:
    """Which of ``names`` are servers whose last check passed."""
    wanted = set(names)
    return {s.name for s in states if s.name in wanted and s.passed and s.running}

