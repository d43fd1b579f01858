"""SlotQueue: at most N at once, first come first served, positions reported."""

from __future__ import annotations

import trio
import trio.testing

from llamad.pool import SlotQueue


async def test_limit_fifo_and_positions(autojump_clock: trio.testing.MockClock) -> None:
    queue = SlotQueue(2)
    running = 0
    most = 0
    order: list[int] = []
    positions: dict[int, list[int]] = {n: [] for n in range(5)}

    async def chat(n: int) -> None:
        nonlocal running, most
        async with queue.slot(positions[n].append):
            running += 1
            most = max(most, running)
            order.append(n)
            await trio.sleep(1)
            running -= 1

    async with trio.open_nursery() as nursery:
        for n in range(5):
            nursery.start_soon(chat, n)
            await trio.sleep(0.01)  # arrival order 0, 1, 2, 3, 4
    assert most == 2
    assert order == [0, 1, 2, 3, 4]
    assert positions == {0: [], 1: [], 2: [1], 3: [2, 1], 4: [3, 2, 1]}


async def test_a_cancelled_waiter_leaves_the_line(autojump_clock: trio.testing.MockClock) -> None:
    queue = SlotQueue(1)
    positions: dict[str, list[int]] = {"a": [], "b": [], "c": []}
    served: list[str] = []

    async def chat(name: str, scope: trio.CancelScope | None = None) -> None:
        with scope or trio.CancelScope():
            async with queue.slot(positions[name].append):
                served.append(name)
                await trio.sleep(1)

    b_scope = trio.CancelScope()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(chat, "a")
        await trio.sleep(0.01)
        nursery.start_soon(chat, "b", b_scope)
        await trio.sleep(0.01)
        nursery.start_soon(chat, "c")
        await trio.sleep(0.01)
        b_scope.cancel()  # b gives up while waiting
    assert served == ["a", "c"]
    assert positions["c"] == [2, 1]
    # The slot count is intact afterwards: one at a time, immediately available.
    async with queue.slot(positions["a"].append):
        pass
    assert positions["a"] == []
