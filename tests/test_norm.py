import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: run the kernels on CPU

import pytest
import torch

from infer.engine.model import RMSNorm
from infer.kernels.norm import reference, rms_norm

TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float16: dict(rtol=2e-3, atol=2e-3)}


def inputs(T, hidden, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(T, hidden, generator=gen).to(dtype)  # [T, hidden]
    w = (1 + 0.1 * torch.randn(hidden, generator=gen)).to(dtype)  # [hidden]
    r = (4 * torch.randn(T, hidden, generator=gen)).to(dtype)  # [T, hidden]
    return x, w, r


def mostly_equal(got, ref):
    """In half precision the kernel rounds where the reference does: all but rare 1-ulp flips are bit-equal
    (fp32 results differ in the last bits: other summation order, other rsqrt)."""
    return got.dtype == torch.float32 or (got == ref).float().mean().item() > 0.98


@pytest.mark.parametrize("T, hidden, dtype", [(1, 96, torch.float32), (9, 576, torch.float16),
                                              (5, 1000, torch.float16), (3, 64, torch.float32)])
def test_rms_norm_matches_reference_and_model(T, hidden, dtype):
    x, w, _ = inputs(T, hidden, dtype)
    got = rms_norm(x, w, 1e-5)
    ref = reference(x, w, 1e-5)
    torch.testing.assert_close(got, ref, **TOL[dtype])
    assert mostly_equal(got, ref)
    model_norm = RMSNorm(hidden, 1e-5).to(dtype)
    model_norm.weight.data.copy_(w)
    assert torch.equal(ref, model_norm(x))


@pytest.mark.parametrize("T, hidden, dtype, scale", [(1, 96, torch.float32, 1.0), (9, 576, torch.float16, 1.0),
                                                     (4, 576, torch.float16, 0.2), (7, 96, torch.float32, 1.4 / 6)])
def test_fused_residual(T, hidden, dtype, scale):
    x, w, r = inputs(T, hidden, dtype, seed=1)
    got, h = rms_norm(x, w, 1e-6, residual=r, residual_scale=scale)
    ref, ref_h = reference(x, w, 1e-6, residual=r, residual_scale=scale)
    torch.testing.assert_close(h, ref_h, **TOL[dtype])
    torch.testing.assert_close(got, ref, **TOL[dtype])
    assert mostly_equal(h, ref_h) and mostly_equal(got, ref)
    model_h = r + x * scale  # DecoderLayer: two roundings in the dtype
    if scale == 1.0:
        assert torch.equal(h, model_h)  # the multiply is exact: one rounding either way
    torch.testing.assert_close(h, model_h, **TOL[dtype])


def test_strided_rows():
    x, w, r = inputs(6, 192, torch.float16, seed=2)
    wide = torch.randn(6, 300).to(torch.float16)
    wide[:, 50:242] = x
    got, h = rms_norm(wide[:, 50:242], w, 1e-6, residual=r)
    ref, ref_h = reference(x, w, 1e-6, residual=r)
    torch.testing.assert_close(h, ref_h, rtol=0, atol=0)
    torch.testing.assert_close(got, ref, **TOL[torch.float16])
