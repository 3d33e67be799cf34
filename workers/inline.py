"""``Dispatch``'s in-process twin, for unit tests of operations, the fleet and the tasks (as
dramatiq's StubBroker is for its actors): what the control plane sends waits in ``sent`` until
``run_all`` runs it in this thread, a stage per message, through the same step bodies a node runs
(``workers.tasks.run_steps``; a host's boxed steps as one batch per action, not taken from its
box), on the nodes it was given; the step that ends a stage does what follows at once
(``operations.stage_ended``: the next stage's advance, which sends it here, or the finish).

A step whose host has no node here is never run, like a message on a dead node's queue: its
chain stops there. Overlap waits end at once.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from typing import NamedTuple

from orchestrator import operations
from orchestrator.dispatch import batches
from orchestrator.models import Step, StepAction
from orchestrator.platform import Platform
from workers.context import NodeContext
from workers.tasks import WORK_OF as TASK_WORK
from workers.tasks import StepFailed, Work, run_steps

WAIT_AT_ONCE = Work(lambda _node, step, _job: {"waited": step.seconds})
WORK_OF = {**TASK_WORK, StepAction.wait: WAIT_AT_ONCE}


class SentStep(NamedTuple):
    id: int
    action: StepAction
    host: str | None


@dataclass
class SentChain:
    """A stage sent (the first of ``stages``: catalogue stage ``first``), with the stages after
    it, which the advance sends one by one once it succeeded (a test may run them by hand)."""

    op_id: int
    stages: list[list[SentStep]]
    env: str
    service: str
    first: int = 0


@dataclass
class SentFinish:
    op_id: int


@dataclass
class InlineDispatch:
    nodes: dict[str, NodeContext] = field(default_factory=dict)
    sent: list[SentChain | SentFinish] = field(default_factory=list)
    platform: Platform | None = None
    revoked: list[int] = field(default_factory=list)  # steps a cancel revoked

    def add_node(self, node: NodeContext) -> None:
        self.nodes[node.host] = node
        self.platform = node.platform

    def send_stage(self, op_id: int, stages: Sequence[Sequence[Step]], index: int, *, env: str,
                   service: str, rung: Sequence[str] = ()) -> None:
        self.sent.append(SentChain(op_id, [[SentStep(s.id or 0, s.action, s.host) for s in stage]
                                           for stage in stages[index:]], env, service, index))

    def send_host_steps(self, hosts: Sequence[str]) -> None:
        """(A stage's boxed steps run with it, in ``run_all``.)"""

    def send_finish(self, op_id: int, *, env: str, service: str, host: str | None) -> None:
        self.sent.append(SentFinish(op_id))

    def revoke(self, step_ids: Sequence[int]) -> None:
        self.revoked.extend(step_ids)

    def run_all(self, limit: int = 1000) -> int:
        """Run what was sent, and what that sends, until nothing is left; returns how many
        messages ran. A finish that must wait for steps is asked again, ``limit`` times at most."""
        count = 0
        while self.sent and count < limit:
            message = self.sent.pop(0)
            count += 1
            if isinstance(message, SentFinish):
                self._finish(message.op_id)
            else:
                self._run_stage(message)  # its last step to end does what follows
        return count

    def _run_stage(self, chain: SentChain) -> None:
        """Run the chain's first stage."""
        home = next((host for stage in chain.stages for _, _, host in stage if host), None)
        for batch in batches(chain.stages[0]):  # a task per batch, as CeleryDispatch sends the unboxed
            node = self.nodes.get(batch[0].host or home or "")
            if node is None:
                continue  # queued on a host no node serves: it never runs
            with suppress(StepFailed):  # its finish was sent; no stage follows
                run_steps(node, [s.id for s in batch], WORK_OF[batch[0].action], env=chain.env,
                          service=chain.service)

    def _finish(self, op_id: int) -> None:
        assert self.platform is not None, "add a node first"
        if operations.finish(self.platform, op_id) is None:
            self.sent.append(SentFinish(op_id))  # Celery's retry
