"""The errors every way in (CLI, API, task API) turns into a refusal: one line, nothing changed."""

from __future__ import annotations


class BadInput(Exception):
    """The request is wrong; nothing was changed. The message is one line for the user."""


class NotFound(BadInput):
    """The request names something the catalogue does not have."""


def one_line(exc: BaseException | None) -> str:
    """An exception's message on one line, for people: its notes too, at most 2000 characters."""
    if exc is None:
        return "unknown error"
    text = "; ".join([str(exc).strip() or type(exc).__name__, *getattr(exc, "__notes__", [])])
    return " ".join(text.split())[:2000]
