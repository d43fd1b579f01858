"""The supervisor on a mock clock: the health watchdog keeps its beat, counts are coalesced."""

from __future__ import annotations

import itertools

import pytest
import trio
import trio.testing

from llamad.config import Supervision
from llamad.events import EventHub, HubEvent, StateEvent
from llamad.policy import hang_detection_bound, health_probe_timeout
from llamad.protocol import ModelStatus
from llamad.server import InFlight
from llamad.supervisor import COUNTS_REPORT_SEC, MachineShell, watch_health


@pytest.mark.parametrize(("interval", "failures"), [(5.0, 3), (1.0, 2), (0.5, 4)])
def test_a_hung_server_is_noticed_within_interval_times_failures(
    interval: float, failures: int
) -> None:
    """The server answers once, then hangs (every probe waits forever): the
    misses come one interval apart, each a probe timeout after its probe, so
    the last needed one is in within hang_detection_bound of the hang."""
    policy = Supervision(health_interval_sec=interval, health_failures=failures)
    timeout = health_probe_timeout(policy)
    reports: list[tuple[float, bool]] = []
    hung_at: list[float] = []

    async def probe() -> bool:
        if not hung_at:
            hung_at.append(trio.current_time())  # answered; the hang starts now
            return True
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    async def main() -> None:
        with trio.move_on_after(interval * (failures + 2)):
            await watch_health(
                probe,
                lambda ok: reports.append((trio.current_time(), ok)),
                interval=interval,
                probe_timeout=timeout,
            )

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    misses = [when for when, ok in reports if not ok]
    assert len(misses) >= failures
    took = misses[failures - 1] - hung_at[0]
    assert took == pytest.approx(interval * failures + timeout)
    assert took <= hang_detection_bound(policy)
    # One probe per interval, however long each took.
    assert [b - a for a, b in itertools.pairwise(misses)] == pytest.approx(
        [interval] * (len(misses) - 1)
    )


def test_the_probe_timeout_is_shorter_than_the_interval() -> None:
    for interval in (0.1, 1.0, 3.0, 5.0, 60.0):
        policy = Supervision(health_interval_sec=interval)
        assert 0 < health_probe_timeout(policy) < interval
    assert health_probe_timeout(Supervision()) == 2.0
    assert hang_detection_bound(Supervision()) == 17.0  # 5 s x 3 + 2 s


class _Counted(MachineShell):
    """A shell with requests in flight and nothing else, to watch what it announces."""

    def __init__(self, hub: EventHub) -> None:
        super().__init__("m", Supervision(), hub, log_lines=10)
        self.requests = InFlight("m", self._count_changed)

    def _event(self) -> StateEvent:
        count = len(self.requests.scopes)
        return StateEvent(ModelStatus(name="m", state=self.state, since=0.0, in_flight=count))


def test_requests_in_flight_are_announced_later_and_once_for_a_burst() -> None:
    """A chat's start and end do not each wake every watcher before the request goes on."""

    async def main() -> None:
        hub = EventHub()
        shell = _Counted(hub)
        with hub.subscribe(frozenset({"state"})) as subscription:
            async with trio.open_nursery() as nursery:
                await nursery.start(shell.run)
                with shell.requests.hold(), shell.requests.hold():
                    pass  # two chats came and went
                with shell.requests.hold():
                    await trio.sleep(COUNTS_REPORT_SEC / 2)
                    with pytest.raises(trio.WouldBlock):
                        subscription.receive.receive_nowait()  # not yet
                    await trio.sleep(COUNTS_REPORT_SEC)
                    (event,) = drain(subscription.receive)
                    assert isinstance(event, StateEvent)
                    assert event.status.in_flight == 1  # the count when announced
                await trio.sleep(COUNTS_REPORT_SEC * 2)
                (event,) = drain(subscription.receive)
                assert isinstance(event, StateEvent)
                assert event.status.in_flight == 0
                nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def drain(receive: trio.MemoryReceiveChannel[HubEvent]) -> list[HubEvent]:
    events = []
    while True:
        try:
            events.append(receive.receive_nowait())
        except trio.WouldBlock:
            return events
