"""The daemon's exception tree.

Every exception a user can cause carries a message that names the problem and
the fix, so the outermost handler prints ``str(exc)`` as one line and exits::

    LlamadError
    ├── ConfigError            models.toml is unreadable or invalid (exit 78, EX_CONFIG)
    ├── ServerBinaryNotFound   no llama-server to run
    ├── UnknownModelError      a name that is neither a model nor an alias
    ├── ModelFileMissing       the model's GGUF file does not exist
    ├── ModelFailed            a model could not be brought up (reason attached)
    │   └── LoadSuperseded     another load was asked for before this one finished
    ├── StartupError           the daemon cannot start (socket in use, bad directory)
    ├── ToolInputError         a tool call's arguments cannot be run (told to the model)
    └── ImageError             an attached image is unreadable, too big or unwanted
"""

from __future__ import annotations

from collections.abc import Sequence


class LlamadError(Exception):
    """Root of llamad's errors; ``str()`` is a complete, user-facing sentence."""


class ConfigError(LlamadError):
    """models.toml cannot be used. ``problems`` holds one line per mistake."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


class ServerBinaryNotFound(LlamadError):
    pass


class UnknownModelError(LlamadError):
    def __init__(self, name: str, known: Sequence[str]) -> None:
        self.name = name
        self.known = list(known)
        listing = ", ".join(self.known) if self.known else "none configured"
        super().__init__(f"unknown model {name!r}; configured models: {listing}")


class ModelFileMissing(LlamadError):
    def __init__(self, model: str, path: str) -> None:
        self.model = model
        self.path = path
        super().__init__(
            f"model {model!r}: file {path} does not exist; fix its path in models.toml"
        )


class ModelFailed(LlamadError):
    def __init__(self, model: str, reason: str) -> None:
        self.model = model
        self.reason = reason
        super().__init__(f"model {model!r} failed: {reason}")


class LoadSuperseded(ModelFailed):
    def __init__(self, model: str, winner: str | None) -> None:
        super().__init__(model, "superseded")
        what = f"a load of {winner!r}" if winner else "an unload"
        self.args = (f"load of {model!r} superseded by {what} requested meanwhile",)


class StartupError(LlamadError):
    pass


class ToolInputError(LlamadError):
    """A tool refused its arguments. The message goes back to the model as the result."""


class ImageError(LlamadError):
    pass
