"""Batches, portions and the portion queue without Ray: backup tasks, late duplicates,
failures; verdicts."""

import torch

from distbelief.distributed.sandblaster import PortionQueue
from distbelief.distributed.sandblaster.portions import Verdicts, batch_indices, portion_indices


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        self.now += 1.0
        return self.now


def test_portion_queue_hands_out_each_portion_then_backups_and_the_first_result_wins():
    q = PortionQueue(3, backup=True, clock=Clock())
    assert [q.take(0), q.take(1), q.take(0)] == [(0, False), (1, False), (2, False)]
    # Nothing new: replica 2 gets a copy of the portion running longest (0, on replica 0).
    assert q.take(2) == (0, False) and q.backups == 1
    # Replica 1 next: portion 1 is its own, 0 has its one backup, so it backs up 2.
    assert q.take(1) == (2, False) and q.backups == 2
    assert q.take(1) is None  # every unfinished portion has its backup
    assert q.finished(2, 0) is True  # the backup wins
    assert q.finished(0, 0) is False and q.wasted == 1  # the original arrives late
    assert q.finished(1, 1) and q.finished(0, 2)
    assert q.done
    assert q.finished(1, 2) is False and q.wasted == 2  # a late duplicate after the round


def test_portion_queue_without_backups_and_after_failures():
    q = PortionQueue(2, backup=False)
    assert q.take(0) == (0, False) and q.take(1) == (1, False)
    assert q.take(0) is None
    q.failed(1)  # replica 1 died with portion 1: it is handed out again
    assert q.take(0) == (1, False)
    assert q.finished(0, 0) and q.finished(0, 1) and q.done
    q.missing({1})  # won, but its gradient never reached the shards: recomputed, solo
    assert not q.done and q.take(0) == (1, True)


def test_batches_partition_the_split_per_epoch_and_full_batch_is_everything():
    assert torch.equal(batch_indices(10, 0, 0, 5), torch.arange(10))
    assert torch.equal(batch_indices(10, 20, 0, 1), torch.arange(10))
    epoch0 = torch.cat([batch_indices(10, 3, 0, k) for k in range(3)])
    assert len(set(epoch0.tolist())) == 9  # three disjoint batches, the last partial dropped
    assert not torch.equal(batch_indices(10, 3, 0, 0), batch_indices(10, 3, 0, 3))  # reshuffled
    assert torch.equal(batch_indices(10, 3, 0, 4), batch_indices(10, 3, 0, 4))
    batch = torch.arange(10)
    parts = [portion_indices(batch, 4, p) for p in range(4)]
    assert torch.equal(torch.cat(parts), batch) and [len(p) for p in parts] == [3, 3, 2, 2]


def test_a_verdict_is_sent_until_a_newer_one_exists_and_dies_with_its_replica():
    verdicts = Verdicts()
    assert verdicts.next(0) is None
    verdicts.decided(0, (1, 3, True))
    assert verdicts.next(0) == (1, 3, True)
    assert verdicts.next(0) == (1, 3, True)  # a flush may overtake the call that carried it
    verdicts.decided(0, (1, 4, False))
    assert verdicts.next(0) == (1, 4, False)
    verdicts.forget(0)
    assert verdicts.next(0) is None
