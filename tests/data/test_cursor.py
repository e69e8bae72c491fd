"""`BatchCursor`: a replica's batches chunk after chunk, from one stream while chunks follow."""

from distbelief.data import BatchCursor, TrainStream


class Counting(TrainStream):
    """Batch i is i; counts the streams it started."""

    batches_per_epoch = 10

    def __init__(self):
        self.started = []

    def batches(self, start):
        self.started.append(start)
        return iter(range(start, 10**6))


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def test_chunks_that_follow_each_other_share_one_stream():
    stream = Counting()
    cursor = BatchCursor(stream)
    assert take(cursor.at(0), 3) == [0, 1, 2]
    cursor.ended(3)
    assert take(cursor.at(3), 2) == [3, 4]
    cursor.ended(5)
    assert stream.started == [0]


def test_a_jump_or_a_lost_chunk_starts_a_new_stream():
    stream = Counting()
    cursor = BatchCursor(stream)
    take(cursor.at(0), 3)
    cursor.ended(3)
    assert take(cursor.at(7), 1) == [7]  # work moved: a jump
    cursor.lost()  # that chunk stopped midway: its retry starts over at its first batch
    assert take(cursor.at(7), 2) == [7, 8]
    assert stream.started == [0, 7, 7]
