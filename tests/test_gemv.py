import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: run the kernels on CPU

import pytest
import torch

from infer.kernels import activation, gemv

TOL = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.float16: dict(rtol=2e-3, atol=2e-3)}


def inputs(N, K, dtype, gated=False, bias=False, residual=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = (3 * torch.randn(1, 2 * K if gated else K, generator=gen)).to(dtype)  # [1, K] or [1, 2K]
    weight = (torch.randn(N, K, generator=gen) / K ** 0.5).to(dtype)  # [N, K]
    return dict(x=x, weight=weight,
                bias=torch.randn(N, generator=gen).to(dtype) if bias else None,
                gated=gated,
                residual=(4 * torch.randn(1, N, generator=gen)).to(dtype) if residual else None)


@pytest.mark.parametrize("N, K, dtype, options", [
    (40, 96, torch.float32, {}),  # N not a multiple of the row block
    (64, 1500, torch.float32, dict(bias=True)),  # K not a multiple of the K block, several K steps
    (33, 200, torch.float16, dict(gated=True)),
    (128, 600, torch.float32, dict(gated=True, residual=True)),
    (96, 2100, torch.float16, dict(bias=True, residual=True)),
    (7, 64, torch.float16, dict(residual=True)),
])
def test_gemv_matches_reference(N, K, dtype, options):
    args = inputs(N, K, dtype, **options, seed=N + K)
    got = gemv.gemv(**args, block_k=512)
    ref = gemv.reference(**args)
    assert got.shape == (1, N) and got.dtype == dtype
    torch.testing.assert_close(got, ref, **TOL[dtype])


@pytest.mark.parametrize("scale", [1.0, 0.3])
def test_fusions_equal_the_unfused_kernels(scale):
    """linear -> residual add, and silu*mul -> linear, each as separate kernels compute them."""
    a = inputs(48, 320, torch.float16, residual=True, seed=3)
    got = gemv.gemv(**a, residual_scale=scale, block_k=128)
    y = gemv.gemv(a["x"], a["weight"], block_k=128)
    torch.testing.assert_close(got, (a["residual"].float() + y.float() * scale).to(torch.float16), rtol=0, atol=2e-3)
    g = inputs(48, 320, torch.float16, gated=True, seed=4)
    unfused = gemv.gemv(activation.silu_mul(g["x"]), g["weight"], block_k=128)
    torch.testing.assert_close(gemv.gemv(**g, block_k=128), unfused, rtol=0, atol=1e-3)


@pytest.mark.parametrize("N, block_n, ties", [(37, 4, False), (300, 8, False), (300, 4, True)])
def test_argmax_packed_by_the_gemv(N, block_n, ties):
    """The argmax buffer ends up holding torch.argmax of the (rounded) output, the first index among equal maxima,
    across programs; take_argmax reads it and empties the buffer for the next pass."""
    args = inputs(N, 64, torch.float16, seed=N)
    if ties:  # equal top rows in different programs: rows 290, 17 and 130 give the same largest output
        args["weight"][[17, 130, 290]] = 2 * args["weight"][0].abs() * args["x"][0].sign()
    best, token = gemv.argmax_buffer(args["x"].device), torch.zeros(1, dtype=torch.long)
    positions = torch.tensor([[5, 6, 7], [6, 7, 8]], dtype=torch.int32)
    for i in range(2):  # the second pass finds the buffer emptied
        y = gemv.gemv(**args, argmax=best, block_n=block_n, out_dtype=torch.float32)
        gemv.take_argmax(best, token, advance=positions)
        assert y.dtype == torch.float32 and torch.equal(y, y.half().float())  # rounded to x's dtype
        assert int(token) == int(y[0].argmax()) and (not ties or int(token) == 17)
        assert (best == -(1 << 63)).all()
        assert positions.tolist() == [[6 + i, 7 + i, 8 + i], [7 + i, 8 + i, 9 + i]]
