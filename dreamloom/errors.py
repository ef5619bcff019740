"""The one error hierarchy of Dreamloom.

Every error raised on purpose by `engine`, `storage` or `studio` derives from
`DreamloomError`; its `str()` is concise, safe to show a user and says how to fix
the input. Front doors catch `DreamloomError` in one handler and show the message;
anything else is a bug and is logged, not shown.
"""
from __future__ import annotations

import re

# An absolute or home-relative filesystem path inside a message (not a URL's path, not a ratio like 16/9).
_PATH = re.compile(r"(?<![\w:/.\-])(?:~[\w.\-]*)?/[\w.\-~+@]+(?:/[\w.\-~+@]+)*/?(?<!\.)")
HIDDEN_PATH = "(a file on the server)"


def public_message(error: BaseException | str) -> str:
    """What Discord and web users see of an error: its message with filesystem paths hidden (a model's folder, the
    data directory). The owner's CLI and the log keep the full message."""
    return _PATH.sub(HIDDEN_PATH, str(error))


class DreamloomError(Exception):
    """Base class: the message is meant for the end user."""


class InvalidPrompt(DreamloomError):
    """A prompt or one of its parameters is malformed or out of range."""

    def __init__(self, message: str, parameter: str | None = None) -> None:
        super().__init__(message)
        self.parameter = parameter


class UnknownModel(DreamloomError):
    """A model or LoRA name that the registry does not know, or a path that does not exist."""


class ModelLoadError(DreamloomError):
    """A model file or folder exists but cannot be loaded."""


class ModelTooLarge(DreamloomError):
    """A model does not fit into the configured memory budget."""


class InvalidImage(DreamloomError):
    """An input image is missing, not an image, too large or otherwise unusable."""


class GenerationCancelled(DreamloomError):
    """The job was cancelled while it ran."""


class EngineUnavailable(DreamloomError):
    """The accelerator failed (out of memory, driver error); the job can be retried."""


class ConfigError(DreamloomError):
    """A settings or registry file is invalid."""


class NotFound(DreamloomError):
    """An id (job, image, user) that does not exist."""


class LimitReached(DreamloomError):
    """A per-user limit (queued jobs, daily quota, a rate) is reached; the message says which and what to do.

    `retry_after` (seconds), when known, is when trying again can succeed (HTTP's Retry-After).
    """

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class NotAllowed(DreamloomError):
    """The user may not do this (banned, not the owner of the job, not an admin)."""


class InvalidRequest(DreamloomError):
    """A request that is malformed in a way other than its prompt (vote value, export target, ...)."""
