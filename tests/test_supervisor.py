"""The supervisor's health watchdog on a mock clock: misses keep their beat."""

from __future__ import annotations

import itertools

import pytest
import trio
import trio.testing

from llamad.config import Supervision
from llamad.policy import hang_detection_bound, health_probe_timeout
from llamad.supervisor import watch_health


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
