"""What travels between replicas and shards (`distributed.wire`), and the shards' threaded
update ranges (`optim.split`, `optim.Ranges`). No Ray."""

import threading

import numpy as np
import pytest
import torch

from distbelief.distributed.wire import WIRE_DTYPES, decode, encode, join_slices
from distbelief.optim import CHUNK, Ranges, sgd_update, split


@pytest.mark.parametrize("name", list(WIRE_DTYPES))
def test_a_vector_travels_as_numpy_and_comes_back_bit_for_bit(name):
    dtype = WIRE_DTYPES[name]
    t = torch.randn(1001).to(dtype)
    array = encode(t)
    assert isinstance(array, np.ndarray) and array.nbytes == t.numel() * t.element_size()
    back = decode(array, dtype)
    assert back.dtype == dtype and torch.equal(back.view(torch.int16 if name != "float32"
                                                         else torch.int32),
                                               t.view(torch.int16 if name != "float32"
                                                      else torch.int32))
    assert back.data_ptr() == t.data_ptr()  # views both ways: no copy


def test_slices_join_into_the_reused_array():
    parts = [encode(torch.arange(3, dtype=torch.bfloat16)),
             encode(torch.arange(3, 7, dtype=torch.bfloat16))]
    first = join_slices(parts, torch.bfloat16)
    assert torch.equal(first.float(), torch.arange(7, dtype=torch.float32))
    out = encode(first)
    again = join_slices(parts[::-1], torch.bfloat16, out=out)
    assert again.data_ptr() == first.data_ptr()
    assert again.float().tolist() == [3, 4, 5, 6, 0, 1, 2]
    single = join_slices(parts[:1], torch.bfloat16, out=out)
    assert single.float().tolist() == [0, 1, 2]  # one shard: its array itself


@pytest.mark.parametrize("n,parts", [(10, 3), (CHUNK * 5 + 3, 3), (CHUNK * 2, 4), (0, 2)])
def test_split_covers_the_vector_in_chunk_aligned_ranges(n, parts):
    ranges = split(n, parts)
    assert ranges[0][0] == 0 and ranges[-1][1] == n and len(ranges) <= parts
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    assert all(lo % CHUNK == 0 for lo, _ in ranges)
    assert all(hi > lo for lo, hi in ranges) or n == 0


def test_ranges_on_three_threads_update_bit_for_bit_as_one():
    n = 7 * CHUNK + 11
    w0, g = torch.randn(n), torch.randn(n)
    one, three = w0.clone(), w0.clone()
    v1 = sgd_update(one, g, None, 0.1, 0.9, 1e-4, True)
    sgd_update(one, g, v1, 0.1, 0.9, 1e-4, True)
    threads, v3 = set(), torch.empty(n)
    runner = Ranges(3)

    def step(lo, hi, fresh):
        threads.add(threading.get_ident())
        sgd_update(three[lo:hi], g[lo:hi], v3[lo:hi], 0.1, 0.9, 1e-4, True, fresh=fresh)
        return hi - lo

    assert sum(runner.run(n, lambda lo, hi: step(lo, hi, True))) == n
    runner.run(n, lambda lo, hi: step(lo, hi, False))
    assert torch.equal(one, three) and torch.equal(v1, v3)
    assert len(threads) == 3


def test_ranges_raise_what_a_thread_raised():
    def fail(lo, hi):
        if lo > 0:
            raise ValueError("bad range")
        return lo

    with pytest.raises(ValueError, match="bad range"):
        Ranges(2).run(4 * CHUNK, fail)
