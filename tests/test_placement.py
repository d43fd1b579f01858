"""The pool's placement rules, with plain numbers for memory and time."""

from __future__ import annotations

from collections.abc import Sequence

from llamad.placement import (
    GIB,
    Action,
    Admit,
    Budget,
    Evict,
    Memory,
    ModelView,
    Refuse,
    Start,
    Waiting,
    WakeAt,
    plan,
)
from llamad.protocol import ModelState

G = GIB


def model(
    name: str,
    state: ModelState = "stopped",
    gib: float = 1.0,
    *,
    last_used: float = 0.0,
    in_flight: int = 0,
    pinned: bool = False,
    ready_since: float | None = None,
    idle: float | None = None,
    starts: int = 0,
    reason: str = "",
    counted: bool = True,
    gpu_gib: float = 0.0,
) -> ModelView:
    if state == "ready" and ready_since is None:
        ready_since = last_used
    return ModelView(
        name=name,
        state=state,
        memory=Memory(int(gib * G), int(gpu_gib * G)),
        last_used=last_used,
        in_flight=in_flight,
        pinned=pinned,
        ready_since=ready_since,
        idle_unload_after=idle,
        starts=starts,
        reason=reason,
        counted=counted,
    )


def pool(*models: ModelView) -> dict[str, ModelView]:
    return {m.name: m for m in models}


def wait(ticket: int, name: str, since: float = 0.0, deadline: float = 1e9) -> Waiting:
    return Waiting(ticket=ticket, model=name, since=since, deadline=deadline)


def act(
    models: dict[str, ModelView], queue: Sequence[Waiting], budget: Budget, now: float
) -> list[Action]:
    """``plan`` without its WakeAt (tested on its own)."""
    return [a for a in plan(models, queue, budget, now) if not isinstance(a, WakeAt)]


def only(actions: Sequence[Action], kind: type) -> list[Action]:
    return [a for a in actions if isinstance(a, kind)]


def test_starts_a_model_that_fits_beside_the_resident_one() -> None:
    models = pool(model("a", "ready", 2), model("b"))
    actions = act(models, [wait(1, "b")], Budget(host=4 * G), now=10)
    assert actions == [Start("b")]


def test_admits_a_request_to_a_ready_model() -> None:
    models = pool(model("a", "ready", 2))
    assert act(models, [wait(1, "a")], Budget(host=4 * G), now=10) == [Admit(1)]


def test_evicts_the_least_recently_used_idle_model_first() -> None:
    models = pool(
        model("old", "ready", 2, last_used=1),
        model("recent", "ready", 2, last_used=5),
        model("new", gib=2),
    )
    actions = act(models, [wait(1, "new", since=6)], Budget(host=4 * G), now=6)
    assert actions == [Evict("old", "evicted for new")]


def test_starts_once_the_evicted_model_has_exited() -> None:
    stopping = pool(model("old", "stopping", 2), model("recent", "ready", 2), model("new", gib=2))
    assert act(stopping, [wait(1, "new")], Budget(host=4 * G), now=7) == []
    stopped = pool(model("old", "stopped", 2), model("recent", "ready", 2), model("new", gib=2))
    assert act(stopped, [wait(1, "new")], Budget(host=4 * G), now=7) == [Start("new")]


def test_starts_beside_an_exiting_model_when_both_fit() -> None:
    models = pool(model("old", "stopping", 1), model("new", gib=1))
    assert act(models, [wait(1, "new")], Budget(host=4 * G), now=1) == [Start("new")]


def test_never_evicts_a_model_with_requests_in_flight() -> None:
    models = pool(model("busy", "ready", 2, in_flight=1), model("new", gib=3))
    actions = plan(models, [wait(1, "new")], Budget(host=4 * G), now=5)
    assert not only(actions, Evict)
    assert not only(actions, Start)
    assert not only(actions, Refuse)  # it waits for the request to finish
    assert only(actions, WakeAt) == [WakeAt(1e9)]  # ...until its deadline at the latest
    # Finished: now it goes.
    idle = pool(model("busy", "ready", 2), model("new", gib=3))
    assert act(idle, [wait(1, "new")], Budget(host=4 * G), now=6) == [
        Evict("busy", "evicted for new")
    ]


def test_a_drained_model_admits_only_requests_it_owes() -> None:
    # "busy" is being drained for the request of "new" (ticket 2). A request for
    # "busy" that arrived after it was ready and after ticket 2 must wait, or it
    # would keep "busy" resident for ever.
    models = pool(model("busy", "ready", 2, in_flight=1, ready_since=1), model("new", gib=3))
    queue = [wait(2, "new", since=3), wait(3, "busy", since=4)]
    actions = act(models, queue, Budget(host=4 * G), now=5)
    assert Admit(3) not in actions
    # One that was already waiting before ticket 2 is still served first.
    queue = [wait(1, "busy", since=2), wait(2, "new", since=3)]
    assert Admit(1) in act(models, queue, Budget(host=4 * G), now=5)


def test_a_model_evicted_admits_no_later_request_in_the_same_plan() -> None:
    # a is idle and must go for b; a request for a that came after a was ready
    # must not be let in to a server that is being stopped.
    models = pool(model("a", "ready", 2, ready_since=1), model("b", gib=2))
    queue = [wait(2, "b", since=2), wait(3, "a", since=3)]
    assert act(models, queue, Budget(host=3 * G), now=4) == [Evict("a", "evicted for b")]


def test_the_batch_a_model_was_loaded_for_is_served_before_it_is_evicted() -> None:
    # a loading for tickets 1 and 3; ticket 2 (b) needs a's room. When a becomes
    # ready, both 1 and 3 go in; 2 waits.
    loading = pool(model("a", "starting", 2), model("b", gib=2))
    queue = [wait(1, "a", since=0), wait(2, "b", since=0.1), wait(3, "a", since=0.2)]
    assert plan(loading, queue, Budget(host=3 * G), now=0.3) == [WakeAt(1e9)]
    ready = pool(model("a", "ready", 2, ready_since=1.0), model("b", gib=2))
    actions = plan(ready, queue, Budget(host=3 * G), now=1.0)
    assert Admit(1) in actions
    assert Admit(3) in actions
    assert not only(actions, Evict)


def _swaps(requests: list[str], *, room_for_one: bool = True) -> int:
    """Drive plan() through a queue of requests submitted at once; count model starts."""
    names = sorted(set(requests))
    models = pool(*(model(n, gib=2) for n in names))
    budget = Budget(host=(3 if room_for_one else 8) * G)
    queue = [wait(i + 1, name, since=i * 0.001) for i, name in enumerate(requests)]
    now = 1.0
    starts = 0
    for _ in range(1000):
        if not queue:
            return starts
        actions = plan(models, queue, budget, now)
        now += 1.0
        for action in actions:
            match action:
                case Start(name):
                    starts += 1
                    models[name] = model(name, "ready", 2, ready_since=now, last_used=now)
                case Evict(name):
                    models[name] = model(name, "stopped", 2, last_used=now)
                case Admit(ticket):
                    queue = [w for w in queue if w.ticket != ticket]
                    # Served at once: it was in flight and finished.
                    for name, m in models.items():
                        if m.state == "ready":
                            models[name] = model(
                                name, "ready", 2, ready_since=m.ready_since, last_used=now
                            )
                case Refuse():
                    raise AssertionError(action)
                case WakeAt():
                    pass
    raise AssertionError("did not finish")


def test_alternating_requests_do_not_thrash() -> None:
    alternating = ["a", "b"] * 10
    assert _swaps(alternating) == 2  # naive: one swap per request, 20


def test_two_models_that_fit_are_started_once_each() -> None:
    assert _swaps(["a", "b"] * 10, room_for_one=False) == 2


def test_pinned_models_are_never_evicted() -> None:
    models = pool(model("embed", "ready", 2, pinned=True), model("chat", gib=3))
    actions = act(models, [wait(1, "chat")], Budget(host=4 * G), now=1)
    assert actions == [
        Refuse(
            1,
            "does_not_fit",
            "chat needs about 3.0 GiB of memory; 2.0 GiB free now; pinned: embed (2.0 GiB)",
        )
    ]


def test_refusal_names_the_figures() -> None:
    models = pool(
        model("embed", "ready", 1.1, pinned=True),
        model("a", "ready", 1, last_used=1),
        model("b", "ready", 1, last_used=2),
        model("big", gib=10.2),
    )
    (refusal,) = act(models, [wait(1, "big")], Budget(host=int(7.2 * G)), now=3)
    assert refusal == Refuse(
        1,
        "does_not_fit",
        "big needs about 10.2 GiB of memory; the whole budget is 7.2 GiB "
        "(memory_budget in models.toml)",
    )
    models["big"] = model("big", gib=6.5)
    (refusal,) = act(models, [wait(1, "big")], Budget(host=int(7.2 * G)), now=3)
    assert isinstance(refusal, Refuse)
    assert refusal.message == (
        "big needs about 6.5 GiB of memory; 6.1 GiB free after unloading 2 other models; "
        "pinned: embed (1.1 GiB)"
    )
    assert not only(act(models, [wait(1, "big")], Budget(host=int(7.2 * G)), now=3), Evict)


def test_max_models_counts_resident_models() -> None:
    models = pool(model("a", "ready", 0.1, last_used=1), model("b", gib=0.1))
    actions = act(models, [wait(1, "b")], Budget(max_models=1), now=2)
    assert actions == [Evict("a", "evicted for b")]
    pinned = pool(model("a", "ready", 0.1, pinned=True), model("b", gib=0.1))
    (refusal,) = act(pinned, [wait(1, "b")], Budget(max_models=1), now=2)
    assert isinstance(refusal, Refuse)
    assert "max_models = 1" in refusal.message


def test_gpu_memory_is_a_budget_of_its_own() -> None:
    models = pool(model("a", "ready", 1, gpu_gib=20, last_used=1), model("b", gib=1, gpu_gib=20))
    budget = Budget(host=64 * G, gpu=30 * G)
    assert act(models, [wait(1, "b")], budget, now=2) == [Evict("a", "evicted for b")]


def test_a_remote_model_costs_no_memory() -> None:
    models = pool(model("local", "ready", 4), model("remote", gib=99, counted=False))
    assert act(models, [wait(1, "remote")], Budget(host=4 * G), now=1) == [Start("remote")]


def test_a_failed_start_refuses_the_requests_that_waited_for_it() -> None:
    models = pool(model("bad", "failed", starts=1, reason="invalid magic characters"))
    request = Waiting(ticket=1, model="bad", since=0, deadline=1e9, starts_seen=0)
    assert act(models, [request], Budget(), now=1) == [
        Refuse(1, "failed", "invalid magic characters")
    ]
    # A new request for a failed model tries again, as `load` does.
    fresh = Waiting(ticket=2, model="bad", since=2, deadline=1e9, starts_seen=1)
    assert act(models, [fresh], Budget(), now=2) == [Start("bad")]


def test_waiting_for_room_times_out() -> None:
    models = pool(model("busy", "ready", 2, in_flight=1), model("new", gib=3))
    late = wait(1, "new", since=0, deadline=300)
    (refusal,) = act(models, [late], Budget(host=4 * G), now=300)
    assert isinstance(refusal, Refuse)
    assert refusal.kind == "timeout"


def test_idle_models_unload_after_their_ttl() -> None:
    models = pool(model("a", "ready", 1, last_used=100, idle=60))
    assert plan(models, [], Budget(), now=130) == [WakeAt(160)]
    assert plan(models, [], Budget(), now=160) == [Evict("a", "idle for 60 s")]
    # In use, waited for, pinned or without a ttl: kept.
    assert plan(pool(model("a", "ready", 1, idle=60, in_flight=1)), [], Budget(), 999) == []
    assert plan(pool(model("a", "ready", 1, idle=60)), [wait(1, "a")], Budget(), 999) == [Admit(1)]
    assert plan(pool(model("a", "ready", 1, idle=60, pinned=True)), [], Budget(), 999) == []
    assert plan(pool(model("a", "ready", 1, idle=None)), [], Budget(), 999) == []


def test_keep_alive_zero_unloads_as_soon_as_idle() -> None:
    models = pool(model("a", "ready", 1, last_used=5, idle=0))
    assert act(models, [], Budget(), now=5) == [Evict("a", "idle for 0 s")]


def test_a_removed_model_refuses_its_waiting_requests() -> None:
    (refusal,) = act({}, [wait(1, "gone")], Budget(), now=1)
    assert isinstance(refusal, Refuse)
    assert "removed" in refusal.message
