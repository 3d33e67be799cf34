"""The catalogue's SQLModel tables, and the public shapes the CLI and API print."""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from pydantic import BaseModel
from sqlalchemy import JSON, Column, Index, LargeBinary, UniqueConstraint
from sqlmodel import Field, SQLModel


def utcnow() -> datetime:
    return datetime.now(UTC)


def empty_list() -> list[str]:
    """A JSON list column's default. Not ``list`` itself: pydantic reads a default factory's
    signature for every instance it makes, and ``list``'s costs about 70 µs against 5 for a
    function (a redeploy of 50 jobs makes 150 rows with such a column)."""
    return []


class ServiceType(StrEnum):
    code = "code"
    postgresql = "postgresql"
    mysql = "mysql"
    redis = "redis"
    memcached = "memcached"
    service_proxy = "service_proxy"
    logging = "logging"
    monitoring = "monitoring"


class HostState(StrEnum):
    up = "up"
    down = "down"
    draining = "draining"


class JobKind(StrEnum):
    deploy = "deploy"
    worker = "worker"


class JobState(StrEnum):
    scheduled = "scheduled"
    starting = "starting"
    running = "running"
    stopping = "stopping"
    stopped = "stopped"
    failed = "failed"
    lost = "lost"  # its host went down; replaced elsewhere, its container removed on return


ACTIVE_JOB_STATES = (JobState.scheduled, JobState.starting, JobState.running)


class RouteState(StrEnum):
    """Whether the service proxy sends a code service's deploy job requests."""

    pending = "pending"  # started by an operation, not yet in the proxy (until it passes there)
    serving = "serving"
    draining = "draining"  # no new requests; those in flight finish
    out = "out"  # out of the proxy (about to stop)


class OpKind(StrEnum):
    deploy = "deploy"
    redeploy = "redeploy"
    scale = "scale"
    worker_deploy = "worker_deploy"
    worker_scale = "worker_scale"
    worker_rm = "worker_rm"
    recover = "recover"  # back to scale after a host was lost
    drain = "drain"  # jobs moved off a draining host
    routes = "routes"  # the service proxy takes a change of sites or certificates
    remove = "remove"  # every job stops; then the service is removed (services rm, env rm)
    run = "run"  # a one-off command in a new container of the service (`orchestrator run`)
    exec = "exec"  # a command in a running job's container (`orchestrator exec`)
    revert = "revert"  # after a failed operation: its new jobs stop, the service is back at scale


class OpTrigger(StrEnum):
    manual = "manual"
    push = "push"
    support = "support"
    create = "create"
    rollback = "rollback"
    host_lost = "host-lost"
    drain = "drain"
    heal = "heal"  # jobs died outside an operation: back to scale
    revert = "revert"  # an operation failed: the service goes back to the jobs it had


class OpState(StrEnum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"  # ended by `ops cancel`: what had not started never will


ENDED_OP_STATES = (OpState.succeeded, OpState.failed, OpState.cancelled)


class StepState(StrEnum):
    pending = "pending"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    skipped = "skipped"


class StepAction(StrEnum):
    check_image = "check_image"
    start = "start"
    stop = "stop"
    wait = "wait"
    start_proxy = "start_proxy"  # a service proxy job: its files written, then its container
    build = "build"  # a pushed source built into the release's image (and pushed to the registry)
    delete_volume = "delete_volume"  # a removed service's data volume (--delete-data)
    run_once = "run_once"  # a one-off container: its output kept, its exit code the step's
    exec = "exec"  # a command run in a job's container
    route = "route"  # a proxy job takes jobs in, drains them or lets them go (runtime API)


class ReleaseState(StrEnum):
    building = "building"  # its operation runs
    succeeded = "succeeded"
    failed = "failed"


class VariableSource(StrEnum):
    connection = "connection"  # a database or cache of the environment
    user = "user"
    platform = "platform"  # the type's own image variables (credentials)
    job = "job"  # computed per job at start (PORT, ORCH_*)


# --- what an operation carries --------------------------------------------------------------------


class ScaleChange(BaseModel):
    """``N`` (relative False) sets a scale; ``+N``/``-N`` (relative True) change it."""

    number: int
    relative: bool = False

    def applied_to(self, current: int) -> int:
        return current + self.number if self.relative else self.number


class ReleaseBefore(BaseModel):
    """The release (and image) an operation replaced when it started; both None before a
    first push."""

    release: int | None = None
    image: str | None = None


class WorkerBefore(BaseModel):
    """A worker target as it was before an operation changed it; ``existed`` False: the
    operation made it."""

    existed: bool = True
    command: str = ""
    scale: int = 0


class OpParams(BaseModel):
    """The typed parameters of an operation (stored as JSON in ``Operation.params``)."""

    release: int | None = None  # push, rollback: the release to run
    image: str | None = None
    scale: int | None = None  # scale: the new deploy scale
    target: str | None = None  # worker operations
    command: str | None = None  # worker deploy; run and exec: the command, run through /bin/sh -c
    argv: list[str] | None = None  # run and exec: the command as words (no shell)
    job: str | None = None  # exec: the job it runs in
    requested_by: str | None = None  # who asked (USER@HOST of the CLI, the API token's name, send_task)
    worker_scale: ScaleChange | None = None
    host: str | None = None  # recover, drain: the host concerned
    jobs: list[str] | None = None  # revert: the jobs of the failed operation to stop
    failed_op: int | None = None  # revert: the operation that failed
    restart: bool | None = None  # revert: start jobs of the kept release up to the scale
    source_id: int | None = None  # a push of a source: what the build step builds
    delete_data: bool | None = None  # remove: its data volume goes too
    # Set when the operation starts: what it replaced, so a failure can put it back.
    release_before: ReleaseBefore | None = None
    scale_before: int | None = None
    worker_before: WorkerBefore | None = None


# --- tables -------------------------------------------------------------------------------------


class Host(SQLModel, table=True):
    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(unique=True, index=True)
    docker_url: str
    address: str = "127.0.0.1"
    state: HostState = HostState.down  # up at its node's first heartbeat
    drained: bool = False  # drained by an operator: back from down, it is draining, not up
    last_seen: datetime | None = None
    cpus: float = 0.0  # 0: not reported yet, no limit assumed
    memory_mb: int = 0
    # Where its node serves its jobs' metrics (/metrics?env=ENV) and its node exporter answers,
    # on its address: set by its node when it starts (None: not yet, or a node without them).
    metrics_port: int | None = None
    node_exporter_port: int | None = None
    # Its node was sent a task to run the steps waiting for it (``dispatch.BOXED``) at this time,
    # and has not taken them yet: a step sent meanwhile waits for that task (None: none sent).
    rung_at: datetime | None = None
    created_at: datetime = Field(default_factory=utcnow)


class WatchPass(SQLModel, table=True):
    """The fleet watcher's last pass (one row). Every platform process runs a watcher, so the
    fleet is watched while any lives; one pass per heartbeat interval is done for them all, by
    the first whose turn comes (``catalogue.claim_watch_pass``)."""

    id: int = Field(default=1, primary_key=True)
    passed_at: datetime
    by: str = ""  # the process that began it: host name and process id


class Environment(SQLModel, table=True):
    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(unique=True, index=True)
    sandbox: bool = False
    # The service proxy's ports, kept for the environment's life (None: made before proxies).
    http_port: int | None = None
    https_port: int | None = None
    removing: bool = False  # env rm: removed once its last service is
    removed_at: datetime | None = None  # removed: renamed NAME.removed.ID, kept for its history
    created_at: datetime = Field(default_factory=utcnow)


class Service(SQLModel, table=True):
    __table_args__ = (UniqueConstraint("env_id", "name"),)
    id: int | None = Field(default=None, primary_key=True)
    env_id: int = Field(foreign_key="environment.id", index=True)
    name: str
    type: ServiceType
    image: str | None = None  # code services: the image of the current release
    command: str | None = None
    size: str = "s"
    scale: int = 1
    overlap: int = 0  # seconds old jobs outlive new ones on a redeploy
    health_path: str | None = None  # code services: HTTP GET must answer 2xx/3xx; None: TCP
    redeployable: bool = True
    release: int | None = None  # code services: the release now deployed (or being deployed)
    variables: dict[str, str] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    credentials: dict[str, str] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    port: int | None = None  # databases and caches: the one port all their jobs use
    host: str | None = None  # databases: the host that holds their data volume
    volume: str | None = None  # databases: their data volume's name (None: made before it was kept)
    active_op_id: int | None = None  # the one operation allowed to touch this service's jobs
    # Healing: jobs that die outside an operation are replaced by a heal operation, with a
    # back-off; after MAX_HEAL_ATTEMPTS in a row it gives up until someone redeploys.
    heal_wanted: bool = False
    heal_attempts: int = 0
    heal_after: datetime | None = None
    heal_gave_up: bool = False
    removed_at: datetime | None = None  # removed: renamed NAME.removed.ID, kept for its history
    created_at: datetime = Field(default_factory=utcnow)


class Site(SQLModel, table=True):
    """A host name the environment's service proxy routes to a code service's deploy jobs."""

    __table_args__ = (UniqueConstraint("env_id", "name"),)
    id: int | None = Field(default=None, primary_key=True)
    env_id: int = Field(foreign_key="environment.id", index=True)
    name: str
    service_id: int = Field(foreign_key="service.id", index=True)
    cert: str | None = None  # PEM chain (TLS sites)
    key: str | None = None  # PEM private key: a secret, never printed nor sent in a task
    created_at: datetime = Field(default_factory=utcnow)


class WorkerTarget(SQLModel, table=True):
    __table_args__ = (UniqueConstraint("service_id", "name"),)
    id: int | None = Field(default=None, primary_key=True)
    service_id: int = Field(foreign_key="service.id", index=True)
    name: str
    command: str
    scale: int = 1


class Release(SQLModel, table=True):
    __table_args__ = (UniqueConstraint("service_id", "number"),)
    id: int | None = Field(default=None, primary_key=True)
    service_id: int = Field(foreign_key="service.id", index=True)
    number: int
    image: str  # built ones: by digest once pushed to the registry (the same bytes every time)
    state: ReleaseState | None = None  # None: made before releases had a state
    build: str | None = None  # how it was built: dockerfile, procfile (None: an image was pushed)
    source_id: int | None = None
    commit: str | None = None  # a git push: the commit built
    command: str | None = None  # a Procfile's web line: its deploy command
    processes: dict[str, str] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    created_at: datetime = Field(default_factory=utcnow)


class BuildSource(SQLModel, table=True):
    """A pushed source (a tar of the directory, Dockerfile included), kept for the node that
    builds it: nodes reach the catalogue wherever they run."""

    id: int | None = Field(default=None, primary_key=True)
    sha256: str = Field(unique=True, index=True)
    data: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    size: int
    created_at: datetime = Field(default_factory=utcnow)


class Job(SQLModel, table=True):
    # What the queries filter on: a service's jobs in a state (active jobs, listings, status);
    # the jobs in a state, of one host or all (host loads, reconciliation, lost hosts).
    __table_args__ = (Index("ix_job_service_id_state", "service_id", "state"),
                      Index("ix_job_state_host", "state", "host"))
    id: str = Field(primary_key=True)
    service_id: int = Field(foreign_key="service.id")  # indexed first in ix_job_service_id_state
    kind: JobKind
    target: str | None = None
    host: str
    port: int | None = None
    container_name: str
    container_id: str | None = None
    state: JobState = JobState.scheduled
    release: int | None = None
    image: str
    command: str | None = None
    size: str
    environment: dict[str, str] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    args: list[str] = Field(default_factory=empty_list, sa_column=Column(JSON, nullable=False))
    mounts: dict[str, str] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    op_id: int | None = None
    route: RouteState = RouteState.serving  # code services' deploy jobs: in the proxy or not
    health_path: str | None = None  # ready when GET answers 2xx/3xx (else: its port accepts TCP)
    error: str | None = None
    created_at: datetime = Field(default_factory=utcnow)
    started_at: datetime | None = None
    stopped_at: datetime | None = None


class Operation(SQLModel, table=True):
    # A service's queued or running operations (claiming the next, one at a time); an
    # environment's, newest first (ops list: an index walk, PostgreSQL included); the watcher's
    # scans of running and queued ones (ix_operation_state).
    __table_args__ = (Index("ix_operation_service_id_state", "service_id", "state"),
                      Index("ix_operation_env_id_id", "env_id", "id"))
    id: int | None = Field(default=None, primary_key=True)
    kind: OpKind
    env_id: int = Field(foreign_key="environment.id")  # indexed first in ix_operation_env_id_id
    service_id: int = Field(foreign_key="service.id")  # and in ix_operation_service_id_state
    trigger: OpTrigger = OpTrigger.manual
    state: OpState = Field(default=OpState.queued, index=True)
    params: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    error: str | None = None
    created_at: datetime = Field(default_factory=utcnow)
    claimed_at: datetime | None = None  # it became its service's active operation
    started_at: datetime | None = None
    sent_at: datetime | None = None  # its first stage reached the broker
    # The last stage sent: each next one is sent once the one before succeeded (``advance``).
    # -1: not planned yet, or (in a catalogue from before) sent whole, as one chain.
    sent_stage: int = Field(default=-1, sa_column_kwargs={"server_default": "-1"})
    finished_at: datetime | None = None
    # What its environment's log has: 0 nothing, 1 its start, 2 its end too. A default in the
    # table as well: a writer that does not know the column (an older process) still inserts.
    logged: int = Field(default=0, index=True, sa_column_kwargs={"server_default": "0"})

    @property
    def parameters(self) -> OpParams:
        return OpParams.model_validate(self.params)

    @parameters.setter
    def parameters(self, value: OpParams) -> None:
        self.params = value.model_dump(mode="json", exclude_none=True)


class Step(SQLModel, table=True):
    # A node's steps waiting for it (its host's pending ones): ``catalogue.claim_host_steps``.
    __table_args__ = (Index("ix_step_host_state", "host", "state"),)

    id: int | None = Field(default=None, primary_key=True)
    op_id: int = Field(foreign_key="operation.id", index=True)
    stage: int
    name: str
    action: StepAction
    host: str | None = None
    job_id: str | None = None
    seconds: int | None = None  # wait steps
    image: str | None = None  # check_image and build steps: the image; delete_volume: the volume
    route: RouteState | None = None  # route steps: where the jobs go (None: the proxy syncs only)
    source_id: int | None = None  # build steps: the source built
    output: str | None = None  # build, run and exec steps: the output, as it comes (its end)
    output_dropped: int = 0  # characters of the output no longer kept (before ``output``)
    exit_code: int | None = None  # run and exec steps
    targets: list[str] = Field(default_factory=empty_list, sa_column=Column(JSON, nullable=False))
    state: StepState = Field(default=StepState.pending, index=True)  # running ones: the watcher's lease check
    error: str | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    node: str | None = None  # the node process that runs (or ran) it: HOST/INCARNATION
    lease_until: datetime | None = None  # running: the node renews it; past it, the step fails


# --- public shapes ------------------------------------------------------------------------------


class HostPublic(SQLModel):
    name: str
    docker_url: str
    address: str
    state: str  # up, down, draining; unknown: its node never sent a heartbeat
    last_seen: datetime | None
    jobs: int = 0
    cpus: float = 0.0
    memory_mb: int = 0
    free_cpus: float = 0.0
    free_memory_mb: int = 0


class EnvironmentPublic(SQLModel):
    name: str
    sandbox: bool


class DashboardPublic(BaseModel):
    """An included service's dashboard: where it answers and its credentials (HTTP basic auth)."""

    url: str
    user: str
    password: str  # masked unless secrets are asked for


class SitePublic(SQLModel):
    name: str
    service: str
    tls: bool


class ServicePublic(SQLModel):
    env: str
    name: str
    type: ServiceType
    image: str | None
    command: str | None
    size: str
    scale: int
    overlap: int
    redeployable: bool
    release: int | None
    port: int | None
    host: str | None
    health_path: str | None = None
    heal_attempts: int = 0  # heals in a row after jobs died outside an operation
    heal_gave_up: bool = False  # it stopped healing: a redeploy (or any user operation) resets it


class JobPublic(SQLModel):
    id: str
    op_id: int | None
    env: str
    service: str
    kind: JobKind
    target: str | None
    host: str
    port: int | None
    container_id: str | None
    container_name: str
    state: JobState
    release: int | None
    image: str
    error: str | None


class ReleasePublic(SQLModel):
    number: int
    image: str
    state: ReleaseState | None = None
    current: bool = False
    build: str | None = None
    commit: str | None = None
    created_at: datetime


class StepPublic(SQLModel):
    name: str
    action: StepAction
    stage: int
    host: str | None
    job: str | None
    state: StepState
    error: str | None
    started_at: datetime | None
    finished_at: datetime | None
    output: str | None = None  # build, run and exec steps: the output (its last 256 KiB)
    output_dropped: int = 0  # characters before ``output`` no longer kept
    exit_code: int | None = None


class OperationPublic(SQLModel):
    id: int
    kind: OpKind
    env: str
    service: str
    trigger: OpTrigger
    state: OpState
    params: dict[str, Any]
    error: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    steps: list[StepPublic]


class VariableView(SQLModel):
    """A variable a service's next jobs get, and where it comes from."""

    name: str
    value: str
    source: VariableSource
    secret: bool


class Role(StrEnum):
    user = "user"
    support = "support"


class ApiToken(SQLModel, table=True):
    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(unique=True, index=True)
    role: Role
    token_hash: str = Field(unique=True, index=True)  # sha256 of the token; the token is shown once
    created_at: datetime = Field(default_factory=utcnow)
