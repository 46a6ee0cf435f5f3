import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: run the kernels on CPU

import gguf
import numpy as np
import pytest
import torch

from infer.engine.errors import InferError
from infer.kernels import quant
from infer.weights.catalogue import CATALOGUE, fetch_gguf

# The tensor types of the demo GGUFs: the others are tested on blocks made here.
DEMO_TYPES = {
    "qwen2.5-coder-0.5b-instruct": {"F32", "Q8_0", "Q5_0", "Q4_K", "Q6_K"},
    "smollm2-135m-instruct": {"F32", "Q8_0", "Q4_1"},
}
# gguf-py quantizes these (it only dequantizes the K types)
QUANTIZABLE = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"]
# byte offsets of each block's fp16 scales (d, and the min or dmin where the type has one)
FP16_FIELDS = {"Q8_0": (0,), "Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q4_K": (0, 2),
               "Q5_K": (0, 2), "Q6_K": (208,)}
# zero, signed, the smallest subnormal and normal, the largest finite
EDGE_FP16 = torch.tensor([0.0, -0.0, 1.0, -1.0, 2.0 ** -24, 2.0 ** -14, 65504.0, -65504.0], dtype=torch.float16)
PLAIN_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
BLOCK_TYPES = [name for name, t in quant.QUANT_TYPES.items() if t.block_elems > 1]  # the types kernels decode


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal float32 tensors, bit for bit (-0.0 differs from 0.0)."""
    return a.shape == b.shape and torch.equal(a.view(torch.int32), b.view(torch.int32))


def gguf_dequantize(data: torch.Tensor, name: str) -> torch.Tensor:
    return torch.from_numpy(gguf.quants.dequantize(data.numpy(), gguf.GGMLQuantizationType[name]).copy())


def random_blocks(name: str, n_rows: int, n_blocks: int, seed: int) -> torch.Tensor:
    """uint8 [n_rows, n_blocks * block_bytes] of valid blocks: random bytes with finite fp16 scales (the edge values
    among them); row 0's other bytes all 0xFF (every nibble and bit at its maximum, int8 scales -1), row 1's all 0."""
    qt = quant.quant_type(name)
    gen = torch.Generator().manual_seed(seed)
    if name in PLAIN_DTYPES:
        values = torch.randn(n_rows, n_blocks, generator=gen).to(PLAIN_DTYPES[name])
        values.view(-1)[:len(EDGE_FP16)] = EDGE_FP16.to(values.dtype)
        return values.view(torch.uint8).reshape(n_rows, -1)
    blocks = torch.randint(0, 256, (n_rows, n_blocks, qt.block_bytes), dtype=torch.uint8, generator=gen)
    blocks[0], blocks[1] = 0xFF, 0
    for at in FP16_FIELDS[name]:
        scales = (torch.randn(n_rows, n_blocks, generator=gen) * 4.0 ** torch.randint(-6, 3, (n_rows, n_blocks),
                                                                                      generator=gen)).half()
        scales.view(-1)[torch.randperm(scales.numel(), generator=gen)[:len(EDGE_FP16)]] = EDGE_FP16
        blocks[..., at:at + 2] = scales[..., None].view(torch.uint8)
    return blocks.reshape(n_rows, -1)


def quantized_blocks(name: str, seed: int) -> torch.Tensor:
    """uint8 [6, row_bytes] of 64 (or 4 blocks of) elements from gguf-py's own quantizer: random rows, a zero row
    (zero scales), a constant row, a large and a tiny row, a row with one outlier."""
    K = max(64, 4 * quant.quant_type(name).block_elems)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(6, K, generator=gen)
    x[1], x[2], x[3], x[4] = 0.0, -0.75, x[3] * 3e3, x[4] * 1e-6
    x[5, 7] = 50.0
    packed = gguf.quants.quantize(x.numpy(), gguf.GGMLQuantizationType[name])
    return torch.from_numpy(np.ascontiguousarray(packed).view(np.uint8))


@pytest.fixture(scope="session")
def demo_readers():
    return {name: gguf.GGUFReader(fetch_gguf(CATALOGUE[name])) for name in DEMO_TYPES}


def demo_rows(reader: gguf.GGUFReader, name: str) -> torch.Tensor:
    """uint8 [5, row_bytes]: rows spread over the first tensor of type `name`, or [row_bytes] for a 1-D tensor."""
    t = next(t for t in reader.tensors if t.tensor_type.name == name)
    raw = np.asarray(t.data).view(np.uint8)
    if raw.ndim == 1:
        return torch.from_numpy(raw.copy())
    rows = np.unique(np.linspace(0, raw.shape[0] - 1, 5).astype(np.int64))
    return torch.from_numpy(raw[rows].copy())


def test_type_table_matches_gguf():
    for t in quant.QUANT_TYPES.values():
        ggml = gguf.GGMLQuantizationType[t.name]
        assert t.code == ggml and (t.block_elems, t.block_bytes) == gguf.GGML_QUANT_SIZES[ggml]
        assert quant.quant_type(ggml) is quant.quant_type(t.name) is quant.quant_type(int(ggml)) is t
        assert quant.quant_type(t) is t


@pytest.mark.parametrize("model", DEMO_TYPES)
def test_demo_files_hold_the_types_tested_on_them(demo_readers, model):
    assert {t.tensor_type.name for t in demo_readers[model].tensors} == DEMO_TYPES[model]


@pytest.mark.parametrize("model, name", [(m, n) for m, names in DEMO_TYPES.items() for n in sorted(names)])
def test_demo_blocks(demo_readers, model, name):
    """Real blocks: reference == gguf-py bit for bit, and the Triton dequantize (types with blocks) == reference."""
    data = demo_rows(demo_readers[model], name)
    ref = quant.reference(data, name)
    assert same_bits(ref, gguf_dequantize(data, name))
    if name in BLOCK_TYPES:
        rows = data.reshape(-1, data.shape[-1])
        assert same_bits(quant.dequantize(quant.to_kernel_layout(rows, name), name), ref.reshape(rows.shape[0], -1))


@pytest.mark.parametrize("name", QUANTIZABLE)
def test_reference_on_gguf_quantized_blocks(name):
    data = quantized_blocks(name, seed=len(name))
    assert same_bits(quant.reference(data, name), gguf_dequantize(data, name))


@pytest.mark.parametrize("name", ["Q8_0", "Q4_0", "Q4_1"])
def test_quantize_writes_what_gguf_py_writes(name):
    """quant.quantize (what --quantize runs as a float model loads) writes gguf-py's (ggml's reference quantizer's)
    bytes, on quantized_blocks' rows (zero, constant, large, tiny, an outlier) and on values at rounding ties."""
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(6, 128, generator=gen)
    x[1], x[2], x[3], x[4] = 0.0, -0.75, x[3] * 3e3, x[4] * 1e-6
    x[5, 7] = 50.0
    ties = torch.arange(-64, 64, dtype=torch.float32)[None] / 4  # multiples of a quarter: halves after scaling
    for rows in (x, ties):
        want = np.ascontiguousarray(gguf.quants.quantize(rows.numpy(), gguf.GGMLQuantizationType[name])).view(np.uint8)
        assert torch.equal(quant.quantize(rows, name), torch.from_numpy(want))


@pytest.mark.parametrize("name", quant.QUANT_TYPES)
def test_reference_on_random_blocks(name):
    data = random_blocks(name, n_rows=6, n_blocks=5, seed=1)
    assert same_bits(quant.reference(data, name), gguf_dequantize(data, name))
    assert same_bits(quant.reference(data[3], name), gguf_dequantize(data[3], name))  # one row, 1-D


@pytest.mark.filterwarnings("ignore:overflow encountered in cast")  # fp16 output: values past 65504 become inf
@pytest.mark.parametrize("name", BLOCK_TYPES)
@pytest.mark.parametrize("n_blocks", [3, 6, 8])  # 1, 2 and 4 blocks per step
def test_dequantize_equals_reference(name, n_blocks):
    """7 rows in tiles of 4 (the last one ragged): fp32 bit for bit; fp16 equal to the reference's rounding, bf16
    within one rounding of it (the interpreter truncates to bf16 where torch and GPUs round to nearest even)."""
    qt = quant.quant_type(name)
    blocks = random_blocks(name, n_rows=7, n_blocks=n_blocks, seed=n_blocks)
    ref = quant.reference(blocks, name)
    data = quant.to_kernel_layout(blocks, name)
    tile = 4 * qt.block_elems
    assert same_bits(quant.dequantize(data, name, block_n=4, tile_elems=tile), ref)
    for dtype in (torch.bfloat16, torch.float16):
        got = quant.dequantize(data, name, dtype, block_n=4, tile_elems=tile)
        want = ref.to(dtype)
        assert got.dtype == dtype and (dtype == torch.bfloat16 or torch.equal(got, want))
        torch.testing.assert_close(got, want, rtol=torch.finfo(dtype).eps, atol=0)
    rows = torch.tensor([6, 0, 3, 3, 5])
    assert same_bits(quant.dequantize(data, name, rows=rows, block_n=4, tile_elems=tile), ref[rows])


@pytest.mark.parametrize("name", BLOCK_TYPES)
def test_kernel_layout_round_trips(name):
    """to_kernel_layout keeps the shape and loses nothing; Q8_0 and Q6_K rows are their blocks' bodies, then the
    blocks' d in order; the K-quants' bodies are stored by 16-byte chunks, chunk c of block b at 16 (5 c + b)."""
    qt = quant.quant_type(name)
    data = random_blocks(name, n_rows=3, n_blocks=5, seed=2)
    moved = quant.to_kernel_layout(data, name)
    assert moved.shape == data.shape and torch.equal(quant.from_kernel_layout(moved, name), data)
    if name not in quant.SCALE_MOVED_FROM and name not in quant.CHUNKED:
        assert moved is data
        return
    blocks = data.reshape(3, 5, qt.block_bytes)
    at = quant.SCALE_MOVED_FROM.get(name, qt.block_bytes)
    body = torch.cat([blocks[..., :at], blocks[..., at + 2:]], dim=-1)  # [3, 5, body bytes]
    if name in quant.SCALE_MOVED_FROM:
        assert torch.equal(moved[:, 5 * body.shape[-1]:], blocks[..., at:at + 2].reshape(3, 10))
    for b in range(5):
        for c in range(body.shape[-1] // 16):
            at_chunk = 16 * (5 * c + b) if name in quant.CHUNKED else body.shape[-1] * b + 16 * c
            assert torch.equal(moved[:, at_chunk:at_chunk + 16], body[:, b, 16 * c:16 * c + 16])


def test_unsupported_types():
    for bad, named in [("IQ2_XXS", "IQ2_XXS"), (gguf.GGMLQuantizationType.Q2_K, "Q2_K"), (99, "99")]:
        with pytest.raises(InferError, match=f"unsupported GGUF tensor type {named};"):
            quant.quant_type(bad)
    with pytest.raises(InferError, match="100 bytes is not a whole number of Q4_K blocks"):
        quant.reference(torch.zeros(2, 100, dtype=torch.uint8), "Q4_K")
