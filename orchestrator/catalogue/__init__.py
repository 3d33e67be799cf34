"""Keyword-only queries and mutations of the catalogue: f(*, session, ...).

Callers own the transaction (they commit); these functions add, flush and read. One module per
noun; everything is reachable as ``catalogue.<function>``.
"""

from orchestrator.catalogue.hosts import add_host, get_host, host_loads, host_views, list_hosts
from orchestrator.catalogue.jobs import active_jobs, job_public, list_jobs, move_job_port, set_job_state
from orchestrator.catalogue.operations import (
    begin_operation,
    begin_step,
    claim_next_operation,
    end_operation,
    end_step,
    get_operation,
    list_operations,
    mark_sent,
    operation_public,
    record_operation,
    release_service,
    skip_pending_steps,
    steps_of,
    take_over_step,
)
from orchestrator.catalogue.services import (
    add_release,
    add_service,
    create_env,
    find_worker,
    get_env,
    get_env_by_id,
    get_release,
    get_service,
    get_worker,
    list_envs,
    list_releases,
    list_services,
    service_public,
    set_variables,
    unset_variables,
    update_service,
    want_heal,
    workers_of,
)
from orchestrator.catalogue.tokens import create_token, role_of_token

__all__ = [
    "active_jobs", "add_host", "add_release", "add_service", "begin_operation", "begin_step", "claim_next_operation",
    "create_env", "create_token", "end_operation", "end_step", "find_worker", "get_env",
    "get_env_by_id", "get_host", "get_operation", "get_release", "get_service", "get_worker",
    "host_loads", "host_views", "job_public", "list_envs", "list_hosts", "list_jobs",
    "list_operations", "list_releases", "list_services", "mark_sent", "move_job_port", "operation_public",
    "record_operation", "release_service", "role_of_token", "service_public", "set_job_state",
    "set_variables", "skip_pending_steps", "steps_of", "take_over_step", "unset_variables", "update_service",
    "want_heal",
    "workers_of",
]
