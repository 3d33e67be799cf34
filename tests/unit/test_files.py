"""Files a node writes for its jobs: whole, only when changed, with the mode asked for."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from workers.files import write_whole


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_a_file_is_written_whole_with_its_mode_and_left_alone_when_it_says_the_same(tmp_path: Path) -> None:
    path = tmp_path / "haproxy.cfg"
    assert write_whole(path, "one\n", mode=0o600) is True
    assert path.read_text() == "one\n" and mode_of(path) == 0o600
    assert write_whole(path, "one\n", mode=0o600) is False  # the same: not written again
    assert write_whole(path, "two\n", mode=0o600) is True and path.read_text() == "two\n"
    assert not (tmp_path / ".haproxy.cfg.tmp").exists()


def test_the_mode_holds_whatever_a_leftover_temporary_file_or_the_umask_had(tmp_path: Path) -> None:
    secret = tmp_path / "site.pem"
    leftover = tmp_path / ".site.pem.tmp"  # a write cut short before, world-readable
    leftover.write_text("old")
    leftover.chmod(0o666)
    assert write_whole(secret, "key\n", mode=0o600)
    assert mode_of(secret) == 0o600
    old = os.umask(0o077)
    try:
        shown = tmp_path / "targets.json"
        assert write_whole(shown, "[]", mode=0o644)  # read by the job's own user: 0644 despite the umask
        assert mode_of(shown) == 0o644
    finally:
        os.umask(old)
