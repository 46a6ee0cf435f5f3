import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: run the kernels on CPU

import pytest
import torch

from infer.kernels.pool_keys import num_summaries, pool_keys, reference


def test_num_summaries():
    assert [num_summaries(L) for L in (0, 31, 32, 47, 48, 64, 1000)] == [0, 0, 1, 1, 2, 3, 61]
    assert num_summaries(23, kernel=24, stride=12) == 0 and num_summaries(60, kernel=24, stride=12) == 4


@pytest.mark.parametrize(
    "Hkv, d, L, kernel, stride, dtype",
    [
        (2, 64, 300, 32, 16, torch.float16),
        (1, 128, 157, 32, 16, torch.float32),
        (3, 64, 211, 24, 12, torch.bfloat16),  # kernel not a power of two
        (2, 80, 99, 16, 16, torch.float16),  # head_dim not a power of two, no overlap
    ],
)
def test_pool_matches_reference(Hkv, d, L, kernel, stride, dtype):
    torch.manual_seed(0)
    k = torch.randn(Hkv, L + 13, d, dtype=dtype)
    k[:, L:] = float("nan")  # keys past L must never be read
    C = num_summaries(L, kernel, stride)
    summaries = torch.zeros(Hkv, C + 2, d, dtype=dtype)
    pool_keys(k, summaries, 0, C, kernel, stride)
    torch.testing.assert_close(summaries[:, :C], reference(k, 0, C, kernel, stride))
    assert (summaries[:, C:] == 0).all()


def test_incremental_pooling_equals_pooling_once():
    torch.manual_seed(1)
    Hkv, d, max_len = 2, 64, 400
    k = torch.randn(Hkv, max_len, d, dtype=torch.float16)
    once = torch.zeros(Hkv, 30, d, dtype=torch.float16)
    pool_keys(k, once, 0, num_summaries(max_len))
    steps = torch.full_like(once, float("nan"))
    written = 0
    for L in [100, 101, 177, 260, *range(261, 300), 400]:  # a prefill in chunks, then decode steps
        C = num_summaries(L)
        pool_keys(k, steps, written, C)
        written = C
        assert torch.isnan(steps[:, C:]).all()  # nothing past the requested windows is written
    assert torch.equal(steps[:, :written], once[:, :written])
