"""Every label, queue, task and container name the platform uses, in one place."""

from __future__ import annotations

LABEL_PREFIX = "orchestrator."
LABEL_ENV = "orchestrator.env"
LABEL_SERVICE = "orchestrator.service"
LABEL_JOB = "orchestrator.job"
LABEL_KIND = "orchestrator.kind"
LABEL_TARGET = "orchestrator.target"
LABEL_RELEASE = "orchestrator.release"
LABEL_CONFIG_HASH = "orchestrator.config-hash"

# The variables every job's log lines carry (json-file's "env" option): who wrote each line.
LOG_LABELS = ("ORCH_ENV", "ORCH_SERVICE", "ORCH_JOB", "ORCH_KIND", "ORCH_RELEASE", "ORCH_HOST")
LABEL_SHIPPER = "orchestrator.log-shipper"  # a host's log shipper: the platform it ships for
LABEL_NODE_EXPORTER = "orchestrator.node-exporter"  # a host's node exporter: the platform it serves

CONTROL_QUEUE = "orchestrator"
HOST_QUEUE_PREFIX = "host."

# Tasks run by a host's node: the steps of an operation.
TASK_CHECK_IMAGE = "orchestrator.step.check_image"
TASK_START_JOB = "orchestrator.step.start_job"
TASK_STOP_JOB = "orchestrator.step.stop_job"
TASK_WAIT = "orchestrator.step.wait"
TASK_START_PROXY = "orchestrator.step.start_proxy"
TASK_ROUTE = "orchestrator.step.route"
TASK_BUILD = "orchestrator.step.build"
TASK_DELETE_VOLUME = "orchestrator.step.delete_volume"
TASK_RUN_ONCE = "orchestrator.step.run_once"
TASK_EXEC = "orchestrator.step.exec"
TASK_HOST_STEPS = "orchestrator.step.host_steps"  # a node takes the steps waiting for its host
TASK_ADVANCE = "orchestrator.op.advance"  # sends an operation's next stage
TASK_FINISH = "orchestrator.op.finish"

# The public task API on the control queue (send_task by other services): keep these stable.
TASK_API_REDEPLOY = "orchestrator.redeploy"
TASK_API_SCALE = "orchestrator.scale"
TASK_API_PUSH = "orchestrator.push"
TASK_API_WORKER_SCALE = "orchestrator.worker_scale"


def host_queue(host: str) -> str:
    """The Celery queue consumed by the node of ``host``."""
    return f"{HOST_QUEUE_PREFIX}{host}"


def queue_host(queue: str) -> str | None:
    """The host whose node consumes ``queue`` (None: not a host's queue)."""
    return queue.removeprefix(HOST_QUEUE_PREFIX) if queue.startswith(HOST_QUEUE_PREFIX) else None


# Simulated hosts (``orchestrator sim run``): a Docker URL of their own scheme, and an address in
# the reserved .invalid domain (RFC 2606), which never resolves: nothing can reach one.
SIM_SCHEME = "sim://"
SIM_DOMAIN = "sim.invalid"


def sim_docker_url(host: str) -> str:
    return f"{SIM_SCHEME}{host}"


def sim_address(host: str) -> str:
    return f"{host}.{SIM_DOMAIN}"


def is_simulated(docker_url: str) -> bool:
    return docker_url.startswith(SIM_SCHEME)


# Names derived from env + service join them with "_", which names (DNS labels) cannot contain:
# env "a-b" + service "db" and env "a" + service "b-db" never share a container or a volume.
SEPARATOR = "_"


def container_name(env: str, service: str, job_id: str) -> str:
    """Deterministic container name of a job: a redelivered start adopts it instead of doubling."""
    return SEPARATOR.join(("orch", env, service, job_id))


def volume_name(env: str, service: str) -> str:
    """The named volume that keeps a database service's data across redeploys."""
    return SEPARATOR.join(("orch", env, service, "data"))


def legacy_volume_name(env: str, service: str) -> str:
    """The volume of a database created before names were unambiguous (kept: it holds its data)."""
    return f"orch-{env}-{service}-data"


def shipper_name(host: str, platform_key: str) -> str:
    """The log shipper container of ``host`` (and its volume): one per host and platform, as
    several platforms (test runs) may share one Docker engine."""
    return f"orch-logship-{host}-{platform_key}"


def node_exporter_name(host: str, platform_key: str) -> str:
    """The node exporter container of ``host`` (one per host and platform)."""
    return f"orch-nodeexp-{host}-{platform_key}"
