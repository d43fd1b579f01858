"""The daemon's one exception tree.

Every exception a user can cause carries a message that names the problem and
the fix, so the outermost handler prints ``str(exc)`` as one line. Each class
also carries its protocol ``code`` (what an ``error`` reply says) and its
``http_status`` (what the HTTP API answers), so no transport maps errors by
hand::

    class                        code                 HTTP  when
    LlamadError                  internal             500
    ├── ConfigError              config_error         400  models.toml is unreadable or invalid
    ├── ServerBinaryNotFound     config_error         400  llama_server is no executable
    ├── StartupError             internal             500  the daemon cannot start
    ├── BadRequest               bad_request          400  a request that cannot be served as sent
    │   ├── EmptyMessage                                   a chat with nothing in it
    │   ├── UnknownTool                                    a tool name that does not exist
    │   ├── ImageError                                     an image unreadable, too big, unwanted
    │   ├── AmbiguousConversation                          a prefix matching several conversations
    │   ├── ToolInputError                                 a tool's arguments (told to the model)
    │   └── MethodNotAllowed                          405  an HTTP method the route does not take
    ├── NotFound                 not_found            404
    │   ├── ConversationNotFound                           no conversation has this id or prefix
    │   ├── MessageNotFound
    │   ├── NothingGenerating                              cancel where no reply is being written
    │   ├── ApprovalNotPending                             approve_tool for a call not waiting
    │   └── NoModelNamed                                   a request needs a model, names none
    ├── UnknownModelError        unknown_model        404  neither a model nor an alias
    ├── ModelFileMissing         model_file_missing   404  the model's GGUF file does not exist
    ├── ModelFileInvalid         model_failed         422  not a readable GGUF (magic, truncated)
    ├── ModelFailed              model_failed         503  a model could not be brought up
    │   ├── LoadSuperseded                                 another load or an unload came first
    │   ├── WorkerUnavailable                              an RPC worker it is split over is away
    │   ├── RemoteUnavailable                              its remote server is away or lacks it
    │   ├── DoesNotFit           does_not_fit         503  not enough memory after every eviction
    │   └── LoadTimeout          timeout              504  waited too long for requests in flight
    ├── RequestCancelled         cancelled            503  the model had to stop under a request
    ├── QueueFull                queue_full           429  the model's max_concurrent is reached
    ├── ConversationBusy         busy                 409  a reply is being generated there
    ├── HistoryError             storage              500
    │   ├── HistoryWriteError    storage              507  a write failed; nothing was changed
    │   ├── HistoryOpenError                               the store cannot be opened
    │   └── HistoryUnavailable   history_unavailable  503  running without history
    ├── UpstreamError            upstream             502  llama-server failed or refused
    │   └── ContextOverflow      bad_request          400  the message does not fit the context
    ├── Unauthorized             unauthorized         401  no or wrong API key / token
    ├── Forbidden                forbidden            403  a key not allowed this model, a foreign
    │                                                      Host or Origin
    └── TooLarge                 too_large            413  a request body over the limit
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from llamad.protocol import ErrorCode


class LlamadError(Exception):
    """Root of llamad's errors; ``str()`` is a complete, user-facing sentence."""

    code: ClassVar[ErrorCode] = "internal"
    http_status: ClassVar[int] = 500


class ConfigError(LlamadError):
    """models.toml cannot be used. ``problems`` holds one line per mistake."""

    code: ClassVar[ErrorCode] = "config_error"
    http_status: ClassVar[int] = 400

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


class ServerBinaryNotFound(LlamadError):
    """``[daemon] llama_server`` names no executable: a configuration mistake."""

    code: ClassVar[ErrorCode] = "config_error"
    http_status: ClassVar[int] = 400


class StartupError(LlamadError):
    pass


# ------------------------------------------------------------ bad requests


class BadRequest(LlamadError):
    """A well-typed request whose values cannot be served."""

    code: ClassVar[ErrorCode] = "bad_request"
    http_status: ClassVar[int] = 400


class EmptyMessage(BadRequest):
    def __init__(self) -> None:
        super().__init__("the message is empty; type something to send")


class UnknownTool(BadRequest):
    def __init__(self, name: str, known: Sequence[str]) -> None:
        self.name = name
        super().__init__(f"no tool named {name!r}; built-in tools: {', '.join(known)}")


class ImageError(BadRequest):
    pass


class AmbiguousConversation(BadRequest):
    """An id prefix that matches more than one conversation."""

    def __init__(self, prefix: str, count: int) -> None:
        self.prefix = prefix
        self.count = count
        super().__init__(f"{prefix!r} matches {count} conversations; give more characters")


class ToolInputError(BadRequest):
    """A tool refused its arguments. The message goes back to the model as the result."""


# --------------------------------------------------------------- not found


class NotFound(LlamadError):
    code: ClassVar[ErrorCode] = "not_found"
    http_status: ClassVar[int] = 404


class ConversationNotFound(NotFound):
    """No conversation has this id or id prefix."""

    def __init__(self, query: str) -> None:
        self.query = query
        super().__init__(f"no conversation matches {query!r}; see `llamactl history list`")


class MessageNotFound(NotFound):
    """A conversation has no message with this sequence number."""

    def __init__(self, conversation_id: str, seq: int) -> None:
        self.conversation_id = conversation_id
        self.seq = seq
        super().__init__(f"conversation {conversation_id} has no message {seq}")


class NothingGenerating(NotFound):
    def __init__(self, conversation: str) -> None:
        super().__init__(f"nothing is being generated in conversation {conversation[:13]}")


class ApprovalNotPending(NotFound):
    def __init__(self, conversation: str, call: str) -> None:
        super().__init__(
            f"no tool call {call!r} is waiting for approval in conversation {conversation[:13]}; "
            "it was answered already, timed out, or the reply ended"
        )


class NoModelNamed(NotFound):
    def __init__(self, what: str = "this request") -> None:
        super().__init__(
            f"{what} needs a model and none is loaded or named; name one, "
            "e.g. `llamactl load NAME` (`llamactl models` lists them)"
        )


# ------------------------------------------------------------------ models


class UnknownModelError(LlamadError):
    code: ClassVar[ErrorCode] = "unknown_model"
    http_status: ClassVar[int] = 404

    def __init__(self, name: str, known: Sequence[str]) -> None:
        self.name = name
        self.known = list(known)
        listing = ", ".join(self.known) if self.known else "none configured"
        super().__init__(f"unknown model {name!r}; configured models: {listing}")


class ModelFileMissing(LlamadError):
    code: ClassVar[ErrorCode] = "model_file_missing"
    http_status: ClassVar[int] = 404

    def __init__(self, model: str, path: str) -> None:
        self.model = model
        self.path = path
        super().__init__(
            f"model {model!r}: file {path} does not exist; fix its path in models.toml"
        )


class ModelFileInvalid(LlamadError):
    """A model file that is not a usable GGUF; ``reason`` says what is wrong with it."""

    code: ClassVar[ErrorCode] = "model_failed"
    http_status: ClassVar[int] = 422

    def __init__(self, path: str, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"{path}: {reason}")


class ModelFailed(LlamadError):
    code: ClassVar[ErrorCode] = "model_failed"
    http_status: ClassVar[int] = 503

    def __init__(self, model: str, reason: str) -> None:
        self.model = model
        self.reason = reason
        super().__init__(f"model {model!r} failed: {reason}")


class LoadSuperseded(ModelFailed):
    def __init__(self, model: str, winner: str | None) -> None:
        super().__init__(model, "superseded")
        what = f"a load of {winner!r}" if winner else "an unload"
        self.args = (f"load of {model!r} superseded by {what} requested meanwhile",)


class WorkerUnavailable(ModelFailed):
    """An RPC worker the model is split over does not answer, or serves another model."""

    def __init__(self, model: str, reason: str) -> None:
        super().__init__(model, reason)
        self.args = (f"model {model!r} cannot start: {reason}",)


class RemoteUnavailable(ModelFailed):
    """A remote model's server is unreachable, refuses us, or does not serve the model."""

    def __init__(self, model: str, reason: str) -> None:
        super().__init__(model, reason)
        self.args = (f"model {model!r}: {reason}",)


class DoesNotFit(ModelFailed):
    """Not enough memory for the model even after every eviction allowed."""

    code: ClassVar[ErrorCode] = "does_not_fit"

    def __init__(self, model: str, reason: str) -> None:
        super().__init__(model, reason)
        self.args = (reason,)


class LoadTimeout(ModelFailed):
    code: ClassVar[ErrorCode] = "timeout"
    http_status: ClassVar[int] = 504


class RequestCancelled(LlamadError):
    """A request in flight on a model that had to stop (unload, crash, shutdown)."""

    code: ClassVar[ErrorCode] = "cancelled"
    http_status: ClassVar[int] = 503


class QueueFull(LlamadError):
    code: ClassVar[ErrorCode] = "queue_full"
    http_status: ClassVar[int] = 429

    def __init__(self, model: str, limit: int, retry_after: float = 1.0) -> None:
        self.model = model
        self.retry_after = retry_after
        super().__init__(
            f"model {model!r} already has {limit} requests running or waiting "
            "(max_concurrent); try again shortly"
        )


class ConversationBusy(LlamadError):
    code: ClassVar[ErrorCode] = "busy"
    http_status: ClassVar[int] = 409

    def __init__(self, conversation: str) -> None:
        super().__init__(
            f"a reply is already being generated in conversation {conversation[:13]}; "
            "wait for it or cancel it first"
        )


# ----------------------------------------------------------------- history


class HistoryError(LlamadError):
    """Root of the chat-history errors."""

    code: ClassVar[ErrorCode] = "storage"


class HistoryWriteError(HistoryError):
    """A write failed on disk; the transaction was aborted, nothing changed."""

    http_status: ClassVar[int] = 507

    def __init__(self, path: object, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(
            f"cannot write chat history to {path}: {reason}; nothing already stored was changed"
        )


class HistoryOpenError(HistoryError):
    """The history directory cannot be opened (permissions, newer schema, corruption)."""


class HistoryUnavailable(HistoryError):
    """llamad runs without its history (the data directory cannot be written)."""

    code: ClassVar[ErrorCode] = "history_unavailable"
    http_status: ClassVar[int] = 503


# ---------------------------------------------------------------- upstream


class UpstreamError(LlamadError):
    """llama-server failed or refused; ``str()`` is the line to show the user."""

    code: ClassVar[ErrorCode] = "upstream"
    http_status: ClassVar[int] = 502


class ContextOverflow(UpstreamError):
    code: ClassVar[ErrorCode] = "bad_request"
    http_status: ClassVar[int] = 400


# ------------------------------------------------------------------ access


class Unauthorized(LlamadError):
    code: ClassVar[ErrorCode] = "unauthorized"
    http_status: ClassVar[int] = 401


class Forbidden(LlamadError):
    code: ClassVar[ErrorCode] = "forbidden"
    http_status: ClassVar[int] = 403


class TooLarge(LlamadError):
    code: ClassVar[ErrorCode] = "too_large"
    http_status: ClassVar[int] = 413


class MethodNotAllowed(BadRequest):
    """An HTTP API route asked with a method it does not take; ``allow`` lists those it does."""

    http_status: ClassVar[int] = 405

    def __init__(self, method: str, allow: str) -> None:
        self.allow = allow
        super().__init__(f"{method} is not allowed here; use {allow}")
