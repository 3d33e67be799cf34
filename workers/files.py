"""Files a node writes for a job to read (a proxy's config and certificates, a monitoring job's
configuration and targets): each written whole, and only when it changed."""

from __future__ import annotations

import os
from pathlib import Path


def write_whole(path: Path, text: str, *, mode: int) -> bool:
    """Write ``path`` whole (a temporary file of ``mode``, then a rename: a reader sees the old or
    the new one, never half); one that already says ``text`` is left alone (heartbeats apply
    every beat). Whether it was written."""
    try:
        if path.read_text() == text:
            return False
    except OSError:
        pass
    temporary = path.with_name(f".{path.name}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(temporary, mode)  # whatever the umask, or a temporary file left from before, made it
    os.replace(temporary, path)
    return True
