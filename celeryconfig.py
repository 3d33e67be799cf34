"""Celery settings for every process of the platform. Names only, no logic: the broker and
result backend URLs come from orchestrator.settings when the app is made (orchestrator/platform.py)."""

from orchestrator.names import CONTROL_QUEUE

task_serializer = "json"
result_serializer = "json"
accept_content = ["json"]
event_serializer = "json"

# A step is acknowledged only once done: a node that dies mid-step gets it redelivered, and the
# tasks are idempotent, so that is safe.
task_acks_late = True
task_reject_on_worker_lost = True
worker_prefetch_multiplier = 1
# When the broker connection drops, steps under way go on (they need the catalogue and Docker,
# not the broker); their acknowledgement may fail, and a redelivery of an ended step is skipped.
worker_cancel_long_running_tasks_on_connection_loss = False

# Flower sees every step: sent, started, succeeded or failed, with readable arguments. (It reads
# task events; the result backend only joins the stages of an operation, so it stores no more.)
worker_send_task_events = True
task_send_sent_event = False  # received/started/succeeded events are enough; this one doubles publishes
result_expires = 24 * 3600

task_default_queue = CONTROL_QUEUE
broker_connection_retry_on_startup = True
# Redis: no task of the platform has a priority, so each queue is one list, not four (kombu's
# default steps 0, 3, 6, 9). A worker's wait for messages names every list of every queue it
# consumes: a simulated fleet's process consumes the queues of hundreds of hosts. (A message
# sent with a priority would still go to the one list: the steps only say where it goes.)
broker_transport_options = {"visibility_timeout": 3600, "priority_steps": [0]}
worker_hijack_root_logger = False
