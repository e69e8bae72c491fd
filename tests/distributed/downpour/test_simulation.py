"""The virtual cluster's discrete-event clock (`simulation`) and cost model (`costs`). No Ray,
no training."""

import pytest

from distbelief.distributed.downpour.costs import Network, StepTimes
from distbelief.distributed.downpour.simulation import EventLoop, Signal, SimulationError
from distbelief.engine.config import parse_link, parse_straggle
from distbelief.errors import ConfigError
from distbelief.recipes import get_recipe


def test_processes_interleave_in_simulated_time_order():
    loop, seen = EventLoop(), []

    def worker(name, step):
        def run():
            for i in range(3):
                loop.sleep(step)
                seen.append((round(loop.now, 6), name, i))
        return run

    loop.spawn(worker("slow", 0.3), "slow")
    loop.spawn(worker("fast", 0.2), "fast")
    loop.at(0.5, lambda: seen.append((0.5, "event", 0)))
    loop.run()
    # At 0.6 slow's wake-up (scheduled at 0.3) comes before fast's (scheduled at 0.4).
    assert seen == [(0.2, "fast", 0), (0.3, "slow", 0), (0.4, "fast", 1), (0.5, "event", 0),
                    (0.6, "slow", 1), (0.6, "fast", 2), (0.9, "slow", 2)]
    assert loop.now == pytest.approx(0.9)


def test_a_wait_ends_with_its_signal_or_its_limit():
    loop, seen = EventLoop(), {}
    signal = Signal(loop, 2, sum)

    def waiter():
        seen["early"] = loop.wait(signal, limit=0.1), loop.now
        seen["value"] = signal.result(), loop.now  # blocks until both parts are there

    loop.spawn(waiter, "waiter")
    loop.at(0.2, signal.give, 0, 5)
    loop.at(0.7, signal.give, 1, 6)
    loop.run()
    assert seen["early"] == (False, pytest.approx(0.1))
    assert seen["value"] == (11, pytest.approx(0.7))


def test_a_process_waiting_for_nothing_is_reported_and_errors_come_through():
    loop = EventLoop()
    loop.spawn(lambda: loop.wait(Signal(loop)), "lonely")
    with pytest.raises(SimulationError, match="lonely"):
        loop.run()
    loop.close()

    loop = EventLoop()
    loop.spawn(lambda: loop.wait(Signal(loop)), "blocked")

    def broken():
        loop.sleep(0.1)
        raise ValueError("boom")

    loop.spawn(broken, "broken")
    with pytest.raises(ValueError, match="boom"):
        loop.run()
    loop.close()
    assert all(p.finished and p.glet.dead for p in loop.processes)


def test_closing_frees_every_process_stack_and_runs_its_cleanup():
    loop, cleaned = EventLoop(), []

    def worker(name, seconds):
        def run():
            try:
                loop.sleep(seconds)
            finally:
                cleaned.append(name)
        return run

    loop.spawn(worker("done", 0.1), "done")  # ends, handing the baton on
    loop.spawn(worker("stuck", 0.2), "stuck")
    loop.spawn(lambda: loop.wait(Signal(loop)), "waiting")
    loop.at(0.15, lambda: loop.heap.clear())  # nothing will wake the others
    with pytest.raises(SimulationError, match="stuck, waiting"):
        loop.run()
    assert cleaned == ["done"]
    loop.close()
    assert cleaned == ["done", "stuck"]
    assert all(p.glet.dead for p in loop.processes)


def test_links_serialise_what_a_node_sends_and_receives():
    net = Network(bandwidth=1000.0, latency=0.01)  # 1,000 bytes/s
    # Two messages from one node: the second waits for the first to leave.
    assert net.send(0.0, "a", "s", 500) == pytest.approx(0.51)
    assert net.send(0.0, "a", "s", 500) == pytest.approx(1.01)
    # Another sender to the same receiver waits for the receiver's link.
    assert net.send(0.0, "b", "s", 100) == pytest.approx(1.11)
    assert net.send(0.0, "b", "c", 100) == pytest.approx(0.21)  # b's link: busy until 0.1
    assert net.send(3.0, "a", "a", 10**9) == 3.0  # a node to itself: no network
    assert net.bytes == 1200


def test_link_and_straggle_settings_parse_or_say_what_is_wrong():
    assert parse_link("10gbit,50us") == (pytest.approx(1.25e9), pytest.approx(5e-5))
    assert parse_link("1 Gbit, 0.2ms") == (pytest.approx(1.25e8), pytest.approx(2e-4))
    assert parse_link(".5mb,1.s") == (pytest.approx(5e5), pytest.approx(1.0))
    assert parse_straggle("none") == (0.0, 1.0) and parse_straggle("0.1,4") == (0.1, 4.0)
    for bad in ("10gbit", "fast,50us", "0gbit,1us", "10gbit,50", "1.2.3gbit,1us"):
        with pytest.raises(ConfigError, match="--virtual-link"):
            parse_link(bad)
    for bad in ("2,3", "0.1,0.5", "x"):
        with pytest.raises(ConfigError, match="--virtual-straggle"):
            parse_straggle(bad)


def test_step_times_have_the_mean_asked_and_repeat_per_replica():
    config = get_recipe("digits").replace(virtual_spread=0.3, virtual_straggle="0.1,5")
    a = [StepTimes(config, 1, 0.01).next() for _ in range(1)]
    times = StepTimes(config, 1, 0.01)
    draws = [times.next() for _ in range(20000)]
    assert draws[0] == a[0]  # (seed, replica) decide the draws
    assert StepTimes(config, 2, 0.01).next() != a[0]
    # Mean: 0.01 x (0.9 + 0.1 x 5) = 0.014; about 10% of the steps are 5x.
    assert sum(draws) / len(draws) == pytest.approx(0.014, rel=0.03)
    flat = StepTimes(config.replace(virtual_spread=0.0, virtual_straggle="none"), 0, 0.01)
    assert {flat.next() for _ in range(10)} == {0.01}
