"""The Redis transport of the platform's workers: kombu's, made to survive a broker restart.

When the Redis server goes away, kombu's Redis channels lose their connection; closing them (as
Celery does on a connection error) or acknowledging a step that finished meanwhile then asks
the lost connection for its address and raises AttributeError. Celery does not count that as a
connection error, so the worker ended with "Unrecoverable error". Here it is the connection
error it is: Celery logs it and reconnects, and a step's message that could not be acknowledged
is delivered again later (its step is already over by then, and the redelivery is skipped).
"""

from __future__ import annotations

from typing import Any

import redis
from kombu.transport import TRANSPORT_ALIASES
from kombu.transport import redis as kombu_redis


class Channel(kombu_redis.Channel):
    def _connparams(self, asynchronous: bool = False) -> Any:
        if self.connection is None or self.connection.client is None:
            raise redis.ConnectionError("the connection to the broker was lost")
        return super()._connparams(asynchronous)  # type: ignore[no-untyped-call]


class Transport(kombu_redis.Transport):
    Channel = Channel


def use_for_redis_urls() -> None:
    """Workers of this process reach redis:// brokers through this transport."""
    TRANSPORT_ALIASES["redis"] = f"{__name__}:Transport"
