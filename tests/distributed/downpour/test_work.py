"""WorkQueue: the driver's decisions about who trains what, without Ray."""

from distbelief.distributed.downpour import WorkQueue


def drain(queue, order=None):
    """Finish chunks as they come (replica by replica in `order`), taking new ones."""
    done = []
    chunks = queue.take()
    while chunks or queue.busy():
        pending = [c for q in queue.queued for c in q]
        pending.sort(key=lambda c: (order or []).index(c[0]) if order else 0)
        chunk = pending[0]
        queue.finished(chunk)
        done.append(chunk)
        chunks = queue.take()
    return done


def test_hands_out_exactly_the_total_in_chunks_with_bounded_queues():
    queue = WorkQueue([0, 0, 0], total=95, chunk=10, depth=2)
    first = queue.take()
    assert [len(q) for q in queue.queued] == [2, 2, 2] and len(first) == 6
    done = drain(queue)
    assert queue.completed == 95 and sum(s for _, _, s in done) == 95
    for r in range(3):  # each replica's chunks are contiguous steps of its own
        starts = [(s, n) for rr, s, n in done if rr == r]
        assert all(a + n == b for (a, n), (b, _) in zip(starts, starts[1:]))


def test_a_fast_replica_gets_more_work():
    queue = WorkQueue([0, 0], total=200, chunk=10, depth=1)
    queue.take()
    for _ in range(10):  # replica 0 finishes ten chunks while replica 1 finishes none
        chunk = queue.queued[0][0]
        queue.finished(chunk)
        queue.take()
    assert queue.positions == [100, 0]


def test_warmstart_runs_replica_zero_alone_first():
    queue = WorkQueue([0, 0], total=100, warmstart=25, chunk=10, depth=2)
    assert queue.take() == [(0, 0, 10), (0, 10, 10)]
    queue.finished((0, 0, 10))
    assert queue.take() == [(0, 20, 5)]  # clipped at the warmstart boundary
    queue.finished((0, 10, 10))
    assert queue.take() == []  # replica 1 waits for the warmstart steps to be done
    queue.finished((0, 20, 5))
    assert {c[0] for c in queue.take()} == {0, 1}


def test_a_failed_replica_redoes_its_lost_steps_and_the_total_still_completes():
    queue = WorkQueue([0, 0], total=60, chunk=10, depth=2)
    queue.take()
    queue.finished((1, 0, 10))
    dropped = queue.failed(1)
    assert dropped == [(1, 10, 10)]
    assert (1, 10, 10) in queue.take()  # restarted: continues at its last completed step
    queue.failed(0, give_up=True)
    drain(queue)
    assert queue.positions[0] == 0 and queue.completed == 60


def test_resumes_from_positions():
    queue = WorkQueue([30, 20], total=60, chunk=10, depth=2)
    assert queue.take() == [(0, 30, 10)]


def test_a_paused_replica_gets_no_work_until_resumed():
    queue = WorkQueue([0, 0], total=100, chunk=10, depth=2)
    queue.take()
    queue.failed(1)
    queue.pause(1)  # Ray is restarting it
    assert all(r == 0 for r, _, _ in queue.take()) and queue.alive[1]
    queue.resume(1)
    assert [c for c in queue.take() if c[0] == 1] == [(1, 0, 10), (1, 10, 10)]
