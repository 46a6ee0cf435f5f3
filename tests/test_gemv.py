import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: run the kernels on CPU

import pytest
import torch

from infer.kernels import activation, gemv, quant
from test_quant import BLOCK_TYPES, FP16_FIELDS, random_blocks

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


# ---------------------------------------------------------------------------------------------------------------
# Packed GGUF weights (kernels.quant's types)

# Blocks per row and block_k of the packed tests: whole groups of NB blocks, then NB = 1 steps for the rest (the
# float path; the integer dot's last step instead takes NB blocks, those past the row's end masked).
RAGGED = {32: (5, 64), 256: (3, 512)}  # block_elems -> (blocks per row, block_k)
WORDS = {32: (6, 128), 256: (6, 1024)}  # as RAGGED, and every Q8_0 / Q6_K row 4-byte aligned (gemv.integer_dot)
# The distance in a block between the elements of a byte's low and high nibble (Q8_0: its two halves).
NIBBLE_PARTNER = {"Q4_K": 32, "Q5_K": 32, "Q6_K": 64}


def packed_weight(name: str, N: int, n_blocks: int, seed: int) -> torch.Tensor:
    """uint8 [N, n_blocks * block_bytes] in the kernel layout: tests/test_quant.py's random valid blocks with every
    fp16 scale drawn from N(0, 1) / 256, so that fp16 outputs stay far inside fp16's range."""
    qt = quant.quant_type(name)
    gen = torch.Generator().manual_seed(seed)
    blocks = random_blocks(name, N, n_blocks, seed).reshape(N, n_blocks, qt.block_bytes)
    for at in FP16_FIELDS[name]:
        scales = (torch.randn(N, n_blocks, generator=gen) / 256).half()
        blocks[..., at:at + 2] = scales[..., None].view(torch.uint8)
    return quant.to_kernel_layout(blocks.reshape(N, -1), name)


def packed_inputs(name, N, T, dtype, gated=False, bias=False, residual=False, residual_scale=1.0, seed=0,
                  layout=RAGGED):
    """gemv / skinny_gemm / reference arguments for T rows of x over a packed weight of layout's (RAGGED or WORDS)
    blocks per row, and the block_k that walks them in whole groups and single blocks."""
    qt = quant.quant_type(name)
    n_blocks, block_k = layout[qt.block_elems]
    nb = gemv.group_blocks(n_blocks, block_k // qt.block_elems)
    assert n_blocks // nb >= 1 and n_blocks % nb >= 1  # both loops run
    K = n_blocks * qt.block_elems
    gen = torch.Generator().manual_seed(seed)
    args = dict(x=torch.randn(T, 2 * K if gated else K, generator=gen).to(dtype),  # [T, K] or [T, 2K]
                weight=packed_weight(name, N, n_blocks, seed), qtype=name, gated=gated,
                bias=torch.randn(N, generator=gen).to(dtype) if bias else None,
                residual=(4 * torch.randn(T, N, generator=gen)).to(dtype) if residual else None,
                residual_scale=residual_scale)
    return args, block_k


def values(args) -> torch.Tensor:
    """The packed weight's values, fp32 [N, K]."""
    return quant.reference(quant.from_kernel_layout(args["weight"], args["qtype"]), args["qtype"])


def magnitude(args) -> torch.Tensor:
    """sum_k |w_k x_k| of each output [T, N] (x after the gating): the scale of its rounding errors."""
    x = activation.reference(args["x"]) if args["gated"] else args["x"]
    return x.float().abs() @ values(args).abs().T


def one_row_reference(args) -> torch.Tensor:
    """What gemv computes for one row: `reference`, of x_hat for the integer-dot types (x rounded to 8 bits per
    32), whose result is then rounded to x's dtype as the kernel rounds it."""
    if not gemv.integer_dot(quant.quant_type(args["qtype"]), args["weight"].shape[1]):
        return gemv.reference(**args)
    x = activation.reference(args["x"]) if args["gated"] else args["x"]
    x_hat = quant.round_x_reference(x[0])[None]  # [1, K] fp32
    return gemv.reference(**dict(args, x=x_hat, gated=False)).to(args["x"].dtype)


def assert_near(got, ref, args, dtype):
    """Equal up to fp32 sums in another order, then one rounding to dtype (of y and of the residual add)."""
    assert got.shape == ref.shape and got.dtype == ref.dtype
    rounding = torch.finfo(dtype).eps if dtype != torch.float32 else 0.0
    bound = 1e-5 * magnitude(args) + rounding * (ref.float().abs() + magnitude(args) * args["residual_scale"])
    assert ((got.float() - ref.float()).abs() <= bound).all()


def test_group_blocks():
    """The power of two up to the cap that walks the row in the fewest steps (groups, then single blocks)."""
    assert gemv.group_blocks(16, 4) == 4  # Q4_K, K = 4096: 4 groups
    assert gemv.group_blocks(152, 32) == 16  # Q8_0, K = 4864: 9 groups and 8 blocks (32: 4 + 24 steps)
    assert gemv.group_blocks(28, 32) == 8  # 3 groups and 4 blocks, as few steps as 4 x 7 groups
    assert gemv.group_blocks(37, 32) == 32 and gemv.group_blocks(5, 0) == 1
    assert gemv.group_blocks(3, 8) == 2 and gemv.group_blocks(1, 8) == 1  # never more blocks than the row has


@pytest.mark.parametrize("name, layout", [(name, RAGGED) for name in BLOCK_TYPES]
                         + [(name, WORDS) for name in quant.DOT_TYPES])
@pytest.mark.parametrize("dtype, options", [
    (torch.float32, {}),
    (torch.float16, dict(gated=True, bias=True, residual=True, residual_scale=0.5)),
])
def test_packed_gemv_matches_reference(name, layout, dtype, options):
    """13 rows in programs of 4 (the last ragged), each row whole groups then single blocks; the integer dot
    products where gemv.integer_dot (RAGGED's Q8_0 and Q6_K rows are not 4-byte aligned: the float path)."""
    args, block_k = packed_inputs(name, 13, 1, dtype, **options, seed=len(name), layout=layout)
    got = gemv.gemv(**args, block_n=4, block_k=block_k)
    assert_near(got, one_row_reference(args), args, dtype)


def test_dot_blocks():
    """The most blocks side by side, up to 64, that pad a row by at most a third."""
    assert gemv.dot_blocks(16) == 16  # Q4_K, K = 4096: one step
    assert gemv.dot_blocks(56) == 64  # Q4_K, K = 14336: one step, 8 blocks masked
    assert gemv.dot_blocks(19) == 8  # Q4_K, K = 4864: 3 steps (16 would mask 13 of 32)
    assert gemv.dot_blocks(448) == 64 and gemv.dot_blocks(3) == 4 and gemv.dot_blocks(1) == 1


@pytest.mark.parametrize("name", quant.DOT_TYPES)
def test_integer_dot_default_tile(name):
    """The default tile: 22 blocks a row in 3 steps of 8 (the last with 2 past the row's end), 13 rows in one
    program of 16 (3 past the last row)."""
    args, _ = packed_inputs(name, 13, 1, torch.float32, bias=True, seed=6, layout={32: (22, 128), 256: (22, 1024)})
    qt = quant.quant_type(name)
    assert gemv.integer_dot(qt, args["weight"].shape[1])
    assert gemv.packed_tile(qt, 22, dot=True) == (16, 8 * qt.block_elems, 4)
    assert_near(gemv.gemv(**args), one_row_reference(args), args, torch.float32)


@pytest.mark.parametrize("name", quant.DOT_TYPES)
@pytest.mark.parametrize("gated", [False, True])
def test_integer_dot_is_within_the_rounding_of_x(name, gated):
    """The integer-dot GEMV against the float reference of x itself: off by at most sum_k |w_k| |x_k - x_hat_k|,
    with |x - x_hat| <= max|x| / 254 in each group of 32 (plus the sums' order), and off: x's rounding shows."""
    args, block_k = packed_inputs(name, 13, 1, torch.float32, gated=gated, seed=3, layout=WORDS)
    assert gemv.integer_dot(quant.quant_type(name), args["weight"].shape[1])
    x = activation.reference(args["x"]) if gated else args["x"]
    step = x[0].reshape(-1, 32).abs().amax(-1).repeat_interleave(32) / 254  # [K] the largest |x - x_hat|
    bound = values(args).abs() @ step + 1e-5 * magnitude(args)[0]  # [N]
    err = (gemv.gemv(**args, block_n=4, block_k=block_k) - gemv.reference(**args))[0].abs()
    assert (err <= bound).all() and err.max() > 1e-5 * magnitude(args).max()


def test_integer_dot_reads_a_given_rounding():
    """gemv(rounded=) multiplies the values given (the RMSNorm's, a Concat's shared ones), not x's own rounding."""
    args, block_k = packed_inputs("Q4_K", 13, 1, torch.float32, seed=8, layout=WORDS)
    other = torch.randn_like(args["x"])
    got = gemv.gemv(**args, rounded=quant.round_x(other), block_k=block_k)
    assert torch.equal(got, gemv.gemv(**dict(args, x=other), block_k=block_k))
    assert not torch.equal(got, gemv.gemv(**args, block_k=block_k))


@pytest.mark.parametrize("gated", [False, True])
def test_round_x_matches_its_reference(gated):
    """round_x's int8 values and scales give x_hat exactly; its sums are d * sum(q) of each 16 elements; a group
    of zeros rounds to zeros."""
    gen = torch.Generator().manual_seed(4)
    K = 288  # 9 groups: two programs of 8, the second ragged
    x = (3 * torch.randn(1, 2 * K if gated else K, generator=gen)).half()
    x[0, 32:64] = 0
    q, d, sums = quant.round_x(x, gated)
    want = quant.round_x_reference((activation.reference(x) if gated else x)[0])
    assert torch.equal(q.float().reshape(-1, 32) * d[:, None], want.reshape(-1, 32))
    assert q.abs().max() == 127 and torch.equal(q[32:64], torch.zeros(32, dtype=torch.int8))
    torch.testing.assert_close(sums, q.float().reshape(-1, 16).sum(-1) * d.repeat_interleave(2), rtol=1e-6, atol=0)


@pytest.mark.parametrize("name, ties, layout", [("Q4_K", False, RAGGED), ("Q8_0", True, WORDS), ("Q6_K", True, WORDS),
                                                ("Q5_0", True, RAGGED)])
def test_packed_gemv_packs_the_argmax(name, ties, layout):
    """On packed weights too (integer dot products or not), the argmax buffer ends up holding torch.argmax of the
    rounded output, the first index among equal maxima across programs."""
    args, block_k = packed_inputs(name, 37, 1, torch.float16, seed=5, layout=layout)
    best, token = gemv.argmax_buffer(args["x"].device), torch.zeros(1, dtype=torch.long)
    if ties:  # rows 3, 20 and 30 (three programs) copy the largest output's row
        top = int(one_row_reference(args)[0].argmax())
        args["weight"][[3, 20, 30]] = args["weight"][top].clone()
    y = gemv.gemv(**args, argmax=best, block_n=4, block_k=block_k, out_dtype=torch.float32)
    gemv.take_argmax(best, token)
    assert torch.equal(y, y.half().float())  # rounded to x's dtype
    assert int(token) == int(y[0].argmax()) and (not ties or int(token) == min(3, top))
    assert_near(y.half(), one_row_reference(args), args, torch.float16)


def test_reference_dequantizes_in_chunks(monkeypatch):
    """A large packed weight is dequantized a few rows at a time: same result as all at once."""
    args, _ = packed_inputs("Q4_K", 13, 3, torch.float32)
    whole = gemv.reference(**args)
    monkeypatch.setattr(gemv, "_REFERENCE_CHUNK", 4 * 768)  # 4 rows of K = 768
    torch.testing.assert_close(gemv.reference(**args), whole, rtol=1e-6, atol=1e-6 * float(magnitude(args).max()))


SKINNY_OPTIONS = [{}, dict(bias=True), dict(gated=True), dict(residual=True, residual_scale=0.5)]


@pytest.mark.parametrize("i, name", list(enumerate(BLOCK_TYPES)))
def test_skinny_gemm_matches_reference(i, name):
    """fp32 rows: the reference up to the order of the sums; T and the fusion vary with the type."""
    T, options = (2, 5, 8, 16)[i % 4], SKINNY_OPTIONS[i % len(SKINNY_OPTIONS)]
    args, block_k = packed_inputs(name, 21, T, torch.float32, **options, seed=i)
    got = gemv.skinny_gemm(**args, block_n=16, block_k=block_k)
    assert_near(got, gemv.reference(**args), args, torch.float32)


@pytest.mark.parametrize("T, name", [(2, "Q4_K"), (5, "Q8_0"), (8, "Q6_K"), (16, "Q5_0")])
def test_skinny_gemm_fp16_within_the_stated_bound(T, name):
    """fp16 rows: each weight is rounded to fp16 before its product, so |y - reference| <= 2^-11 sum |w x| (plus
    the sums' order) before the output's rounding: one fp16 rounding more."""
    args, block_k = packed_inputs(name, 21, T, torch.float16, seed=T)
    got, ref = gemv.skinny_gemm(**args, block_n=16, block_k=block_k), gemv.reference(**args)
    bound = (2.0 ** -11 + 1e-5) * magnitude(args) + 2.0 ** -10 * ref.float().abs()
    err = (got.float() - ref.float()).abs()  # [T, N]
    assert got.shape == (T, 21) and (err <= bound).all()
    assert err.max() > 0  # the rounding of the weights shows: the test measures what it states


@pytest.mark.parametrize("name, layout", [(name, RAGGED) for name in BLOCK_TYPES]
                         + [(name, WORDS) for name in quant.DOT_TYPES])
def test_each_weight_lands_in_its_place(name, layout):
    """One-hot rows of x read single weights: every output equals the element of the dequantized weight bit for
    bit, so a permuted row, block or element (e.g. swapped nibbles) fails. Blocks with edge values (test_quant's
    random_blocks); the positions come with their nibble partners, whose weights differ."""
    qt = quant.quant_type(name)
    n_blocks, block_k = layout[qt.block_elems]
    K = n_blocks * qt.block_elems
    blocks = random_blocks(name, 9, n_blocks, seed=7)
    ref = quant.reference(blocks, name)  # [9, K]
    weight = quant.to_kernel_layout(blocks, name)
    partner = NIBBLE_PARTNER.get(name, 16)
    first = torch.randperm(K, generator=torch.Generator().manual_seed(len(name)))[:8]
    positions = torch.cat([first, first ^ partner])  # [16]
    assert all(not torch.equal(ref[:, p], ref[:, q]) for p, q in zip(first, first ^ partner))
    assert len(set(map(tuple, ref.tolist()))) == 9  # distinct rows
    x = torch.eye(K)[positions]  # [16, K]
    assert torch.equal(gemv.skinny_gemm(x, weight, name, block_n=16, block_k=block_k), ref[:, positions].T)
    for p in positions[[0, 8]]:  # the integer dot's x_hat of a one-hot row is 127 * fl(1 / 127): not bit for bit
        got = gemv.gemv(x[positions.tolist().index(p)][None], weight, qtype=name, block_n=4, block_k=block_k)
        exact = not gemv.integer_dot(qt, weight.shape[1])
        torch.testing.assert_close(got[0], ref[:, p], rtol=0 if exact else 1e-6, atol=0)
