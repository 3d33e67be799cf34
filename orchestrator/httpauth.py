"""HTTP basic authentication, as the platform's services (logging, monitoring) are asked with it."""

from __future__ import annotations

import base64


def basic_auth(user: str, password: str) -> str:
    """The ``Authorization`` header's value for ``user`` and ``password``: ``Basic`` and the
    base64 of ``user:password`` in UTF-8."""
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return f"Basic {token}"
