"""Which models are resident: the model pool's decisions, without any I/O.

``plan`` is to memory what ``llamad.policy`` is to restarts: it takes the
models (state, memory, requests in flight, last use), the requests waiting for
a model, the memory budget and the current monotonic time, and returns what
the pool must do: start a model, evict one, admit a waiting request to its
ready model, refuse one, or look again at a given time. Nothing here reads a
clock or touches a process, so every rule is tested with plain numbers.

The rules, in the order ``plan`` applies them:

* **Requests are served in arrival order** (by ticket). A request whose model
  is ready is admitted, unless that model is being drained to make room for an
  earlier request of another model; then only the requests that were already
  waiting when the model became ready (the batch it was loaded for) still go
  in. That is what stops swap thrash: requests alternating A, B, A, B with room
  for one model load A, serve every waiting A, load B, serve every waiting B.
* **A model that is not resident is started when it fits** in the budget next
  to what is resident (a model that is stopping still holds its memory until
  it has exited, so a new one starts beside an exiting one only when both fit).
* **Otherwise room is made**: idle, unpinned models are evicted least recently
  used first. Models with requests in flight (or waiting requests entitled to
  them) are never cut: they are reserved, finish what they have, and are
  evicted then. Pinned models are never evicted.
* **What cannot fit even after every allowed eviction is refused at once**,
  with the figures.
* **Idle models unload** after their idle time (``ttl_sec``, or the last
  request's ``keep_alive``); a request in flight or waiting keeps a model.
* **A request that caused a start which failed is refused** with the model's
  reason, and one that waited longer than its deadline for room is refused
  with a timeout.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

from llamad.protocol import ModelState

GIB = 1024**3
MIB = 1024**2

# States in which a model's server exists (or is about to again) and holds memory.
HOLDING: frozenset[ModelState] = frozenset({"starting", "ready", "stopping", "backoff"})


@dataclass(frozen=True)
class Memory:
    """Bytes on the host and on the GPU(s)."""

    host: int = 0
    gpu: int = 0

    def __add__(self, other: Memory) -> Memory:
        return Memory(self.host + other.host, self.gpu + other.gpu)

    def __sub__(self, other: Memory) -> Memory:
        return Memory(self.host - other.host, self.gpu - other.gpu)


@dataclass(frozen=True)
class Budget:
    """What the pool may use; None means no limit on that dimension."""

    host: int | None = None
    gpu: int | None = None
    max_models: int | None = None

    def fits(self, used: Memory, models: int) -> bool:
        return (
            (self.host is None or used.host <= self.host)
            and (self.gpu is None or used.gpu <= self.gpu)
            and (self.max_models is None or models <= self.max_models)
        )


@dataclass(frozen=True)
class ModelView:
    """One configured model as placement sees it."""

    name: str
    state: ModelState
    memory: Memory  # what it holds when resident: measured once running, else estimated
    last_used: float = 0.0  # monotonic; load time when never used
    in_flight: int = 0  # requests admitted and not yet finished
    pinned: bool = False
    counted: bool = True  # False for a server llamad does not run (remote): costs nothing here
    ready_since: float | None = None  # monotonic time it last became ready
    idle_unload_after: float | None = None  # seconds idle before unloading; None: never
    starts: int = 0  # starts the pool has asked for, so a request can tell its start failed
    reason: str = ""  # why it is in its state (a failure's cause)


@dataclass(frozen=True)
class Waiting:
    """A request waiting for its model to be ready and for the pool to admit it."""

    ticket: int  # arrival order
    model: str
    since: float  # monotonic arrival time
    deadline: float  # monotonic; refused with a timeout if still waiting for room by then
    starts_seen: int = 0  # the model's ``starts`` when the request arrived


# ------------------------------------------------------------------ actions


@dataclass(frozen=True)
class Start:
    model: str


@dataclass(frozen=True)
class Evict:
    """Stop a resident model. ``reason`` begins ``evicted for`` or ``idle for``."""

    model: str
    reason: str


@dataclass(frozen=True)
class Admit:
    ticket: int


RefusalKind = Literal["does_not_fit", "failed", "timeout"]


@dataclass(frozen=True)
class Refuse:
    ticket: int
    kind: RefusalKind
    message: str


@dataclass(frozen=True)
class WakeAt:
    """Nothing changes by itself before this monotonic time; plan again then."""

    when: float


Action = Start | Evict | Admit | Refuse | WakeAt


# -------------------------------------------------------------- the planner


@dataclass
class _Plan:
    """The projected pool while one ``plan`` call walks the queue."""

    models: dict[str, ModelView]
    budget: Budget
    actions: list[Action] = field(default_factory=list)
    starting: set[str] = field(default_factory=set)  # started by this plan
    evicted: set[str] = field(default_factory=set)  # evicted by this plan: admits nothing more
    evicting: set[str] = field(default_factory=set)  # evicted by this plan, or reserved
    reserved: dict[str, int] = field(default_factory=dict)  # model -> ticket it drains for

    def holding(self) -> list[ModelView]:
        return [
            m
            for m in self.models.values()
            if m.counted and (m.state in HOLDING or m.name in self.starting)
        ]

    def used(self) -> tuple[Memory, int]:
        held = self.holding()
        return sum((m.memory for m in held), Memory()), len(held)


def plan(
    models: Mapping[str, ModelView],
    waiting: Sequence[Waiting],
    budget: Budget,
    now: float,
) -> list[Action]:
    """What the pool must do now. See the module docstring for the rules."""
    state = _Plan(dict(models), budget)
    queue = sorted(waiting, key=lambda w: w.ticket)
    for request in queue:
        _serve(state, request, queue, now)
    _idle_unloads(state, queue, now)
    decided = {a.ticket for a in state.actions if isinstance(a, Admit | Refuse)}
    wake = [w.deadline for w in queue if w.ticket not in decided and _waits_for_room(state, w)]
    wake += [when for when in _unload_times(state, queue) if when > now]
    if wake:
        state.actions.append(WakeAt(min(wake)))
    return state.actions


def _waits_for_room(state: _Plan, request: Waiting) -> bool:
    model = state.models[request.model]
    return model.state in ("stopped", "failed") and request.model not in state.starting


def _entitled(request: Waiting, model: ModelView, before_ticket: int) -> bool:
    """Whether ``request`` must be served before ``model`` may be evicted for ``before_ticket``.

    Earlier requests always are; later ones only if they were waiting when the
    model became ready (or it is not ready yet): the batch it was loaded for.
    """
    if request.ticket < before_ticket:
        return True
    return model.ready_since is None or request.since <= model.ready_since


def _serve(state: _Plan, request: Waiting, queue: Sequence[Waiting], now: float) -> None:
    model = state.models.get(request.model)
    if model is None:
        message = f"model {request.model!r} was removed from models.toml"
        state.actions.append(Refuse(request.ticket, "failed", message))
        return
    if model.state == "ready":
        if model.name in state.evicted:
            return  # on its way out; this request loads it again afterwards
        reserver = state.reserved.get(model.name)
        if reserver is None or _entitled(request, model, reserver):
            state.actions.append(Admit(request.ticket))
            state.models[model.name] = replace(model, in_flight=model.in_flight + 1)
        return
    if model.state in ("starting", "backoff", "stopping") or model.name in state.starting:
        return  # coming up, or going down before it can come up again
    # Stopped or failed: a start this request saw fail is the end of it.
    if model.starts > request.starts_seen:
        why = model.reason or model.state
        state.actions.append(Refuse(request.ticket, "failed", why))
        return
    if now >= request.deadline:
        state.actions.append(
            Refuse(
                request.ticket,
                "timeout",
                f"model {model.name!r} waited {now - request.since:.0f} s for other models' "
                "requests in flight to finish; try again, or unload a model",
            )
        )
        return
    _make_room(state, request, queue)


def _make_room(state: _Plan, request: Waiting, queue: Sequence[Waiting]) -> None:
    model = state.models[request.model]
    need = model.memory
    used, count = state.used()
    if not model.counted or state.budget.fits(used + need, count + 1):
        state.actions.append(Start(model.name))
        state.starting.add(model.name)
        return
    # Room must be made. Whatever is already on its way out frees its memory soon.
    candidates = [m for m in state.holding() if not m.pinned and m.name != model.name]
    leaving = [m for m in candidates if m.state == "stopping" or m.name in state.evicting]
    others = [m for m in candidates if m not in leaving]
    freed = sum((m.memory for m in leaving), Memory())
    gone = len(leaving)

    def fits_after(freed: Memory, gone: int) -> bool:
        return state.budget.fits(used - freed + need, count - gone + 1)

    idle = sorted(
        (m for m in others if not _busy(m, queue, request.ticket)), key=lambda m: m.last_used
    )
    busy = sorted((m for m in others if _busy(m, queue, request.ticket)), key=lambda m: m.last_used)
    to_evict: list[ModelView] = []
    to_reserve: list[ModelView] = []
    for m in idle:
        if fits_after(freed, gone):
            break
        to_evict.append(m)
        freed, gone = freed + m.memory, gone + 1
    for m in busy:
        if fits_after(freed, gone):
            break
        to_reserve.append(m)
        freed, gone = freed + m.memory, gone + 1
    if not fits_after(freed, gone):
        state.actions.append(
            Refuse(request.ticket, "does_not_fit", _does_not_fit(state, model, need))
        )
        return
    for m in to_evict:
        state.actions.append(Evict(m.name, f"evicted for {model.name}"))
        state.evicted.add(m.name)
        state.evicting.add(m.name)
    for m in to_reserve:
        # Drained, not cut: admitted requests finish, the batch it was loaded
        # for is still served, and then it is idle and evicted by a later plan.
        state.reserved.setdefault(m.name, request.ticket)
        state.evicting.add(m.name)


def _busy(model: ModelView, queue: Sequence[Waiting], ticket: int) -> bool:
    if model.in_flight:
        return True
    return any(w.model == model.name and _entitled(w, model, ticket) for w in queue)


def _does_not_fit(state: _Plan, model: ModelView, need: Memory) -> str:
    """The refusal, with the figures: what it needs, what would be free, what is pinned."""
    budget = state.budget
    pinned = [m for m in state.holding() if m.pinned and m.name != model.name]
    pinned_text = ", ".join(f"{m.name} ({_size(m.memory.host)})" for m in pinned)
    unpinned = [m for m in state.holding() if not m.pinned and m.name != model.name]
    free_after = _free_after(state, unpinned)
    if budget.gpu is not None and need.gpu > free_after.gpu:
        what, needed, free, limit = "GPU memory", need.gpu, free_after.gpu, budget.gpu
    elif budget.host is not None and need.host > free_after.host:
        what, needed, free, limit = "memory", need.host, free_after.host, budget.host
    else:  # only the count is in the way
        return (
            f"{model.name} cannot start: max_models = {budget.max_models} and "
            f"{len(pinned)} pinned models are resident ({pinned_text or 'none'})"
        )
    if needed > limit:
        return (
            f"{model.name} needs about {_size(needed)} of {what}; the whole budget is "
            f"{_size(limit)} (memory_budget in models.toml)"
        )
    unloading = f"after unloading {len(unpinned)} other models" if unpinned else "now"
    text = f"{model.name} needs about {_size(needed)} of {what}; {_size(free)} free {unloading}"
    if pinned:
        text += f"; pinned: {pinned_text}"
    return text


def _free_after(state: _Plan, evicted: list[ModelView]) -> Memory:
    used, _ = state.used()
    left = used - sum((m.memory for m in evicted), Memory())
    host = (state.budget.host or 0) - left.host
    gpu = (state.budget.gpu or 0) - left.gpu
    return Memory(max(host, 0), max(gpu, 0))


def _idle_unloads(state: _Plan, queue: Sequence[Waiting], now: float) -> None:
    for model in list(state.models.values()):
        when = _unload_time(model, queue)
        if when is not None and when <= now and model.name not in state.evicting:
            idle = model.idle_unload_after or 0.0
            state.actions.append(Evict(model.name, f"idle for {_duration(idle)}"))
            state.evicted.add(model.name)
            state.evicting.add(model.name)


def _unload_time(model: ModelView, queue: Sequence[Waiting]) -> float | None:
    """When ``model`` unloads for being idle, or None while it is in use or kept."""
    if model.state != "ready" or model.pinned or model.idle_unload_after is None:
        return None
    if model.in_flight or any(w.model == model.name for w in queue):
        return None
    return model.last_used + model.idle_unload_after


def _unload_times(state: _Plan, queue: Sequence[Waiting]) -> list[float]:
    times = (_unload_time(m, queue) for m in state.models.values() if m.name not in state.evicting)
    return [t for t in times if t is not None]


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:g} s"
    if seconds < 7200:
        return f"{seconds / 60:g} min"
    return f"{seconds / 3600:g} h"


def _size(size: int) -> str:
    """Bytes for people: ``10.2 GiB``, ``512 MiB``."""
    if size >= GIB:
        return f"{size / GIB:.1f} GiB"
    if size >= MIB:
        return f"{size / MIB:.0f} MiB"
    return f"{size / 1024:.0f} KiB"


def size_text(size: int) -> str:
    """The public spelling of ``_size`` for status lines and messages."""
    return _size(size)
