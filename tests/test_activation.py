import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: run the kernels on CPU

import pytest
import torch
import torch.nn.functional as F

from infer.kernels.activation import reference, silu_mul

TOL = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.float16: dict(rtol=1e-3, atol=1e-3)}


@pytest.mark.parametrize("T, I, dtype", [(1, 96, torch.float32), (9, 576, torch.float16), (4, 1536, torch.float16),
                                         (7, 2500, torch.float32), (2, 5, torch.float16)])
def test_silu_mul_matches_reference(T, I, dtype):
    gen = torch.Generator().manual_seed(T * I)
    gate_up = (3 * torch.randn(T, 2 * I, generator=gen)).to(dtype)  # [T, 2I]
    got = silu_mul(gate_up)
    ref = reference(gate_up)
    assert got.shape == (T, I)
    torch.testing.assert_close(got, ref, **TOL[dtype])
    if dtype != torch.float32:
        assert (got == ref).float().mean().item() > 0.98  # rounded once, as the reference
    gate, up = gate_up.chunk(2, dim=-1)
    model = F.silu(gate) * up  # the model's code: rounds silu(gate) before the multiply
    torch.testing.assert_close(got, model, rtol=2 * TOL[dtype]["rtol"], atol=2 * TOL[dtype]["atol"])


def test_strided_rows():
    gen = torch.Generator().manual_seed(0)
    wide = torch.randn(3, 1000, generator=gen).to(torch.float16)
    gate_up = wide[:, 10:810]  # [3, 800], row stride 1000
    torch.testing.assert_close(silu_mul(gate_up), reference(gate_up), **TOL[torch.float16])
