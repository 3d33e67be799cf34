"""PURE: what a pushed source is and how it is built: a directory with a Dockerfile is built
with it; one with a Procfile (and no Dockerfile) is built on the platform's Python base image,
its ``web:`` line the deploy command and its other lines worker targets. Images built for a
service are named after its environment and service, tagged by release."""

from __future__ import annotations

import io
import re
import tarfile
from dataclasses import dataclass, field

from orchestrator.errors import BadInput

PYTHON_BASE_IMAGE = "orch/python:3"  # made locally from Debian by scripts/build-images
MAX_SOURCE = 64 * 1024 * 1024  # bytes of a pushed source (a tar of the directory)
LOCAL_REPOSITORY = "orch-build"  # built images' repository when no registry is set
_PROCESS = re.compile(r"([A-Za-z0-9_-]{1,63}):\s*(.+)")


@dataclass(frozen=True)
class Source:
    """A pushed source as the platform builds it: the build context (a tar holding a Dockerfile)
    and what its Procfile says."""

    context: bytes
    kind: str  # "dockerfile" or "procfile"
    processes: dict[str, str] = field(default_factory=dict)  # Procfile: name -> command

    @property
    def web(self) -> str | None:
        return self.processes.get("web")


def parse_procfile(text: str) -> dict[str, str]:
    """``name: command`` per line; blank lines and # comments are skipped."""
    processes: dict[str, str] = {}
    for number, raw in enumerate(text.removeprefix("\ufeff").splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        match = _PROCESS.fullmatch(line)
        if match is None:
            raise BadInput(f"Procfile line {number} is not `name: command`: {line[:80]!r}")
        name, command = match.group(1).lower().replace("_", "-"), match.group(2).strip()
        if name in processes:
            raise BadInput(f"Procfile names {name} twice")
        processes[name] = command
    if not processes:
        raise BadInput("the Procfile names no process")
    return processes


def procfile_dockerfile(requirements: bool) -> str:
    """The Dockerfile of a Procfile app: requirements first, so an unchanged requirements.txt
    keeps its layer (and a push of changed code only copies the code)."""
    lines = [f"FROM {PYTHON_BASE_IMAGE}", "WORKDIR /app"]
    if requirements:
        lines += ["COPY requirements.txt /app/requirements.txt",
                  "RUN pip install --no-cache-dir -r /app/requirements.txt"]
    lines += ["COPY . /app"]
    return "\n".join(lines) + "\n"


def source_from_tar(data: bytes) -> Source:
    """Check a pushed directory (as a tar) and make its build context: refused with a one-line
    reason unless it holds a Dockerfile, or a Procfile (then a Dockerfile is added)."""
    if len(data) > MAX_SOURCE:
        raise BadInput(f"the source is {len(data) // 1024 // 1024} MiB: at most {MAX_SOURCE // 1024 // 1024} MiB")
    try:
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            names = {m.name.removeprefix("./"): m for m in tar.getmembers() if m.isfile()}
            if "Dockerfile" in names:
                return Source(data, "dockerfile")
            if "Procfile" not in names:
                raise BadInput("the source has neither a Dockerfile nor a Procfile: nothing says how to build it")
            procfile = tar.extractfile(names["Procfile"])
            text = procfile.read().decode(errors="replace") if procfile else ""
    except tarfile.TarError as exc:
        raise BadInput(f"the source is not a readable tar: {exc}") from None
    processes = parse_procfile(text)
    dockerfile = procfile_dockerfile("requirements.txt" in names).encode()
    out = io.BytesIO()
    with tarfile.open(fileobj=io.BytesIO(data)) as tar, tarfile.open(fileobj=out, mode="w") as new:
        for member in tar.getmembers():
            new.addfile(member, tar.extractfile(member) if member.isfile() else None)
        info = tarfile.TarInfo("Dockerfile")
        info.size = len(dockerfile)
        new.addfile(info, io.BytesIO(dockerfile))
    return Source(out.getvalue(), "procfile", processes)


def image_name(registry: str, env: str, service: str, release: int) -> str:
    """Where a release's built image goes: the platform's registry, else a local name."""
    repository = f"{registry.rstrip('/')}/{env}/{service}" if registry else f"{LOCAL_REPOSITORY}/{env}/{service}"
    return f"{repository}:r{release}"


def repository_of(image: str) -> str:
    """``host:5000/a/b:r3`` -> ``host:5000/a/b`` (a port is not a tag)."""
    head, _, last = image.rpartition("/")
    name = last.split("@", 1)[0].split(":", 1)[0]
    return f"{head}/{name}" if head else name
