"""PURE: the log shipper of a Docker host, as rsyslog configuration.

Every job container writes Docker's json-file log with the job's ORCH_* variables in each line's
``attrs`` (the platform creates it with ``log-opts env=ORCH_ENV,...``). One shipper per Docker
host (the ``orch/logging:1`` image in ``logship`` mode) reads those files and sends each line to
the logging service of the line's environment:

    imfile (inotify) on /docker/containers/*/*-json.log* (the rotated .1, .2 too, see below)
      -> mmjsonparse: the Docker line into $! (its attrs: $!attrs!ORCH_ENV, ...)
      -> only lines of this platform host ($!attrs!ORCH_HOST), several hosts may share an engine
      -> one omrelp action per environment, each with its own disk-assisted queue, so a logging
         service that is down or restarting costs nothing but a backlog on the host, delivered
         when it answers again; lines of environments without a logging service are dropped.

The message sent is RFC 5424 whose MSG is ``{"file": <the log file's path>, "entry": <the Docker
line as it is, one JSON object>}``: the logging service takes the container id from the path.

Docker rotates a log by renaming it (max-size). imfile follows a renamed file it has open, but
a file written and renamed away between two of its looks (a burst, or a shipper held back by a
slow logging service) would never be seen under the ``-json.log`` name: the rotated names are
watched too. A rotated file is the same inode, so imfile resumes it from the offset it keeps per
inode; what it may read twice (offsets are saved every PERSIST_EVERY lines) the logging service
stores once (a line's key is its container, time, stream and text).

``shipper_config`` is the whole file (the node passes it as LOGSHIP_CONF); ``config_hash`` says
when the node must recreate the shipper.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass

CONTAINERS_DIR = "/docker/containers"  # Docker's containers directory, mounted read-only
WORK_DIR = "/var/spool/orch-logship"  # imfile's state and the disk queues (a named volume)
LOG_FILES = f"{CONTAINERS_DIR}/*/*-json.log*"
# Docker splits a line at 16 KiB of text; JSON escaping can make it up to six times longer
# (\u0000), plus the attrs: anything longer is cut by rsyslog and then dropped (not JSON).
MAX_MESSAGE_SIZE = "256k"
QUEUE_MAX_DISK_SPACE = "512m"  # per environment: its backlog while its logging service is away
QUEUE_IN_MEMORY = 5000  # messages (parsed, a few KB each) per environment before they spill to disk
# RELP frames in flight per connection. librelp sets no TCP_NODELAY: with the default of 128 a
# window costs a delayed ACK (~40 ms), which caps a connection at ~3,000 lines/s.
RELP_WINDOW = 4096
PERSIST_EVERY = 1000  # lines read between two saves of a file's offset
TEMPLATE = "orch-ship"
RULESET = "orch-ship"

# Host and environment names are DNS labels (rules.check_name); checked again here because
# they are written into the configuration: nothing else can reach it.
_NAME = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
_ADDRESS = re.compile(r"[A-Za-z0-9:][A-Za-z0-9.:-]{0,252}")  # a host name, IPv4 or IPv6 (no brackets)


@dataclass(frozen=True)
class Target:
    """One environment's logging service, as a host's shipper reaches it."""

    env: str
    address: str
    syslog_port: int


def _check(kind: str, value: str, pattern: re.Pattern[str]) -> str:
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise ValueError(f"{kind} {value!r} cannot go into the shipper's configuration")
    return value


def valid_target(target: Target) -> bool:
    """Whether ``target`` can go into a shipper's configuration (one that cannot is left out,
    not allowed to stop every other environment's shipping)."""
    try:
        _check_target(target)
    except ValueError:
        return False
    return True


def _check_target(target: Target) -> Target:
    _check("environment name", target.env, _NAME)
    _check("address", target.address, _ADDRESS)
    port = target.syslog_port
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise ValueError(f"syslog port {port!r} of environment {target.env} is not a TCP port")
    return target


def _template(host: str) -> str:
    # RFC 5424: <PRI>1 TIMESTAMP HOSTNAME APP-NAME PROCID MSGID SD MSG. The Docker line is
    # JSON already: it goes in as it is, the file name is escaped for JSON.
    return f"""template(name="{TEMPLATE}" type="list") {{
  constant(value="<")
  property(name="pri")
  constant(value=">1 ")
  property(name="timereported" dateFormat="rfc3339")
  constant(value=" {host} orch-logship - - - {{\\"file\\":\\"")
  property(name="$!metadata!filename" format="json")
  constant(value="\\",\\"entry\\":")
  property(name="msg")
  constant(value="}}")
}}"""


def _action(target: Target) -> str:
    # A queue of its own per environment (queue.filename makes it disk-assisted: in memory
    # while the service keeps up, spilled to the work dir when it does not, saved there on
    # shutdown). Retried forever, every second at first: rsyslog widens the interval after
    # each 10 failures, up to resumeIntervalMax.
    return f"""  if $!attrs!ORCH_ENV == "{target.env}" then {{
    action(type="omrelp" name="ship-{target.env}" target="{target.address}" port="{target.syslog_port}"
           template="{TEMPLATE}" timeout="30" conn.timeout="5" windowSize="{RELP_WINDOW}"
           queue.type="LinkedList" queue.filename="ship-{target.env}" queue.size="{QUEUE_IN_MEMORY}"
           queue.dequeueBatchSize="512" queue.maxDiskSpace="{QUEUE_MAX_DISK_SPACE}"
           queue.maxFileSize="16m" queue.saveOnShutdown="on" queue.timeoutShutdown="1000"
           queue.timeoutEnqueue="10000"
           action.resumeRetryCount="-1" action.resumeInterval="1" action.resumeIntervalMax="10")
    stop
  }}"""


def shipper_config(host: str, targets: Sequence[Target]) -> str:
    """The rsyslog configuration of the shipper of ``host``: the lines of its job containers go
    to the logging service of their environment (``targets``, at most one per environment).
    ValueError when a name, address or port could not be written safely into it."""
    _check("host name", host, _NAME)
    checked = sorted((_check_target(t) for t in targets), key=lambda t: t.env)
    envs = [t.env for t in checked]
    if len(set(envs)) != len(envs):
        raise ValueError(f"one logging service per environment: {envs}")
    actions = "\n".join(_action(t) for t in checked)
    return f"""# The log shipper of host {host} (orchestrator.logship): written by the platform, used as it is.
global(workDirectory="{WORK_DIR}" maxMessageSize="{MAX_MESSAGE_SIZE}")
# What imfile submitted is queued in memory; saved to the work dir when the shipper stops.
main_queue(queue.type="LinkedList" queue.filename="main" queue.size="10000" queue.saveOnShutdown="on"
           queue.maxDiskSpace="64m" queue.timeoutShutdown="1000")

module(load="imfile" mode="inotify")
module(load="mmjsonparse")
module(load="omrelp")

# rsyslog's own messages (the default ruleset gets nothing else) go to the container's output.
template(name="orch-internal" type="string" string="rsyslogd: %msg%\n")
action(type="omfile" file="/dev/stdout" template="orch-internal")

{_template(host)}

# Docker rotates a log by renaming it (max-size): the rotated names are read too, from the offset
# imfile keeps per inode in the work dir (a line read twice is stored once by the service).
input(type="imfile" file="{LOG_FILES}" tag="docker" ruleset="{RULESET}" addMetadata="on"
      reopenOnTruncate="on" persistStateInterval="{PERSIST_EVERY}")

ruleset(name="{RULESET}") {{
  action(type="mmjsonparse" cookie="")
  if $parsesuccess != "OK" then stop
  if $!attrs!ORCH_HOST != "{host}" then stop
{actions}
  stop
}}
"""


def config_hash(text: str) -> str:
    """A short, stable hash of a shipper's configuration: a new one means a new shipper."""
    return hashlib.sha256(text.encode()).hexdigest()[:16]
