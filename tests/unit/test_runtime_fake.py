"""The runtime contract on FakeRuntime (the real one runs in tests/integration/test_runtime_docker.py)."""

from __future__ import annotations

import pytest

from tests.runtime_contract import RuntimeContract, Target
from workers.runtime.fake import FakeRuntime

IMAGE = "orch/busybox:1"
CRASH_IMAGE = "orch/crashing:1"


class TestFakeRuntime(RuntimeContract):
    @pytest.fixture
    def target(self) -> Target:
        runtime = FakeRuntime(images={IMAGE, CRASH_IMAGE}, crashing={CRASH_IMAGE})
        return Target(runtime=runtime, image=IMAGE, crash_image=CRASH_IMAGE,
                      missing_image="orch/missing:0", label=("orch-contract", "fake"))

