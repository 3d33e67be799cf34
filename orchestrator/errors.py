"""The errors every way in (CLI, API, task API) turns into a refusal: one line, nothing changed."""

from __future__ import annotations


class BadInput(Exception):
    """The request is wrong; nothing was changed. The message is one line for the user."""


class NotFound(BadInput):
    """The request names something the catalogue does not have."""
