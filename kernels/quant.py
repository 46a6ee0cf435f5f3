"""GGUF (GGML) weight blocks: the supported types, exact dequantization in torch, and Triton block decoders.

A 2-D weight of N rows of K elements is uint8 [N, K // block_elems * block_bytes], each row its blocks back to
back (GGUF stores rows contiguously, so a tensor's raw bytes reshape to this): the file's layout, which `reference`
reads. The kernels read the kernel layout (`to_kernel_layout`), which differs from it in two ways. Q8_0 and Q6_K
blocks (34 and 210 bytes) leave their quants only 2-byte aligned, so each block's fp16 scale d moves to the end of
its row (the quants can then be read as aligned 32-bit words). Q4_K, Q5_K and Q6_K rows are stored by 16-byte
chunks of their blocks (a load of the same chunk of consecutive blocks is then one contiguous run). F32, F16 and
BF16 are "blocks" of one element to the reference (the loader keeps those weights dense: no kernel decodes them).

Semantics (`reference`): the float32 values gguf-py's `gguf.quants.dequantize` gives, bit for bit, computed with
the same float32 operations in the same order. Every product in these formats is exact in float32: it has at most
23 significant bits (11 of an fp16 scale, at most 12 of an integer sub-scale and quant together) and is never
subnormal (the smallest fp16 is 2^-24). So the only rounding is the final add of the offset types (Q4_1, Q5_1,
Q4_K, Q5_K), and contracting that multiply-add into an FMA, as GPU compilers do, cannot change the result.

Triton: `decode_<type>(w_ptr, row_off, block, row_mask, NB)` decodes NB consecutive blocks of BLOCK_N rows in
registers, for other kernels to build on (a GEMV multiplies the values by x loaded at their columns, `dequantize`
stores them there). Each one loads a row's quant bytes of a block as contiguous runs (vectorizable: a Q4_K block's
128 quant bytes start 16-byte aligned), its fp16 scales as single gathered loads, Q4_K/Q5_K's packed sub-scales
as three 32-bit words decoded four at a time, and returns the values in two halves shaped as the bytes hold them
(a byte's low nibbles, then its high nibbles), never merged: see the section "Triton decoders" below.

Under the CPU interpreter `dequantize` equals `reference` bit for bit in float32 on every type (tests/test_quant.py);
by the argument above a GPU build should too (not measured here). bf16/fp16 output is the float32 value rounded
once (to nearest even on GPUs; the interpreter truncates to bf16).
"""

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from infer.engine.errors import InferError
from infer.kernels import activation, pdl


@dataclass(frozen=True)
class QuantType:
    """A GGML tensor type: each row is a run of blocks of block_bytes bytes, each holding block_elems values."""

    name: str
    code: int  # the ggml_type number a GGUF tensor info stores
    block_elems: int
    block_bytes: int

    def row_elems(self, row_bytes: int) -> int:
        """K, the elements of a row of row_bytes bytes."""
        if row_bytes % self.block_bytes:
            raise InferError(f"a row of {row_bytes} bytes is not a whole number of {self.name} blocks "
                             f"({self.block_bytes} bytes each)")
        return row_bytes // self.block_bytes * self.block_elems


QUANT_TYPES = {t.name: t for t in (
    QuantType("F32", 0, 1, 4),
    QuantType("F16", 1, 1, 2),
    QuantType("BF16", 30, 1, 2),
    QuantType("Q8_0", 8, 32, 34),
    QuantType("Q4_0", 2, 32, 18),
    QuantType("Q4_1", 3, 32, 20),
    QuantType("Q5_0", 6, 32, 22),
    QuantType("Q5_1", 7, 32, 24),
    QuantType("Q4_K", 12, 256, 144),
    QuantType("Q5_K", 13, 256, 176),
    QuantType("Q6_K", 14, 256, 210),
)}
QUANT_TYPES_BY_CODE = {t.code: t for t in QUANT_TYPES.values()}


def quant_type(code_or_name) -> QuantType:
    """The QuantType of a GGML type code (an int, or gguf's GGMLQuantizationType) or name such as "Q4_K"."""
    if isinstance(code_or_name, QuantType):
        return code_or_name
    found = QUANT_TYPES.get(code_or_name) if isinstance(code_or_name, str) else QUANT_TYPES_BY_CODE.get(int(code_or_name))
    if found is None:
        name = getattr(code_or_name, "name", code_or_name)  # gguf's GGMLQuantizationType carries its name
        raise InferError(f"unsupported GGUF tensor type {name}; supported: {', '.join(QUANT_TYPES)}")
    return found


# ---------------------------------------------------------------------------------------------------------------
# torch reference: blocks [N, n_blocks, block_bytes] uint8 -> [N, n_blocks, ...] float32 in element order


def _field(blocks: torch.Tensor, start: int, stop: int, dtype: torch.dtype) -> torch.Tensor:
    """Bytes [start, stop) of every block, read as little-endian dtype: [N, n_blocks, (stop - start) / size]."""
    return blocks[..., start:stop].contiguous().view(dtype)


def _f16(blocks: torch.Tensor, at: int) -> torch.Tensor:
    """The fp16 at byte `at` of every block, as float32: [N, n_blocks, 1]."""
    return _field(blocks, at, at + 2, torch.float16).float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """[..., n] bytes -> [..., 2n]: the n low nibbles, then the n high nibbles."""
    return torch.cat([qs & 0x0F, qs >> 4], dim=-1)


def _bits(qh: torch.Tensor) -> torch.Tensor:
    """[..., n] bytes -> [..., 8n] 0/1: bit b of byte i at 8i + b (bit j of a little-endian word at j)."""
    shifts = torch.arange(8, dtype=torch.uint8, device=qh.device)
    return ((qh[..., None] >> shifts) & 1).flatten(-2)


def _k_scales(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The 8 six-bit (scale, min) pairs of a Q4_K/Q5_K block, from its 12 bytes at 4..15, as uint8 [N, n_blocks, 8].

    Bytes 0-3 hold scales 0-3 in their low 6 bits, bytes 4-7 mins 0-3; bytes 8-11 hold the low 4 bits of scales
    4-7 (low nibble) and mins 4-7 (high nibble), whose top 2 bits are the top bits of bytes 0-3 (scales) and 4-7
    (mins).
    """
    packed = blocks[..., 4:16].unflatten(-1, (3, 4))  # [N, n_blocks, 3, 4]
    s, m, low = packed[..., 0, :], packed[..., 1, :], packed[..., 2, :]
    scales = torch.cat([s & 0x3F, (low & 0x0F) | ((s >> 2) & 0x30)], dim=-1)
    mins = torch.cat([m & 0x3F, (low >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return scales, mins


def _ref_f32(blocks):
    return _field(blocks, 0, 4, torch.float32)


def _ref_f16(blocks):
    return _field(blocks, 0, 2, torch.float16).float()


def _ref_bf16(blocks):
    return _field(blocks, 0, 2, torch.bfloat16).float()


def _ref_q8_0(blocks):  # d fp16 @0 | qs int8[32] @2: element i = qs[i] * d
    return _field(blocks, 2, 34, torch.int8).float() * _f16(blocks, 0)


def _ref_q4_0(blocks):  # d fp16 @0 | qs[16] @2: byte i holds elements i (low nibble) and 16 + i; d * (q - 8)
    q = _nibbles(blocks[..., 2:18]).to(torch.int8) - 8
    return _f16(blocks, 0) * q.float()


def _ref_q4_1(blocks):  # d fp16 @0 | m fp16 @2 | qs[16] @4 (as Q4_0): d * q + m
    return _f16(blocks, 0) * _nibbles(blocks[..., 4:20]).float() + _f16(blocks, 2)


def _ref_q5_0(blocks):  # d fp16 @0 | qh u32 @2: bit i is bit 4 of element i | qs[16] @6 (as Q4_0): d * (q - 16)
    q = (_nibbles(blocks[..., 6:22]) | (_bits(blocks[..., 2:6]) << 4)).to(torch.int8) - 16
    return _f16(blocks, 0) * q.float()


def _ref_q5_1(blocks):  # d fp16 @0 | m fp16 @2 | qh u32 @4 | qs[16] @8 (as Q5_0): d * q + m
    q = _nibbles(blocks[..., 8:24]) | (_bits(blocks[..., 4:8]) << 4)
    return _f16(blocks, 0) * q.float() + _f16(blocks, 2)


def _ref_k_quant(blocks, q):
    """Q4_K/Q5_K: d fp16 @0, dmin fp16 @2, (scale, min) pairs @4; q [N, n_blocks, 8, 32] the quants of the 8
    sub-blocks of 32 elements: element = (d * scale) * q - dmin * min."""
    scales, mins = _k_scales(blocks)
    d = (_f16(blocks, 0) * scales.float())[..., None]  # [N, n_blocks, 8, 1]
    dm = (_f16(blocks, 2) * mins.float())[..., None]
    return d * q.float() - dm


def _k_nibbles(qs: torch.Tensor) -> torch.Tensor:
    """Q4_K/Q5_K quant bytes [N, n_blocks, 128] -> [N, n_blocks, 8, 32]: byte 32g + i holds elements 64g + i (low
    nibble, sub-block 2g) and 64g + 32 + i (high nibble, sub-block 2g + 1)."""
    return _nibbles(qs.unflatten(-1, (4, 32))).unflatten(-1, (2, 32)).flatten(-3, -2)


def _ref_q4_k(blocks):  # d, dmin, scales (see _ref_k_quant) | qs[128] @16 (see _k_nibbles)
    return _ref_k_quant(blocks, _k_nibbles(blocks[..., 16:144]))


def _ref_q5_k(blocks):  # as Q4_K, with qh[32] @16: bit k of byte i is bit 4 of element 32k + i | qs[128] @48
    low = _k_nibbles(blocks[..., 48:176])
    shifts = torch.arange(8, dtype=torch.uint8, device=blocks.device)[:, None]  # [8, 1]
    high = (blocks[..., None, 16:48] >> shifts) & 1  # [N, n_blocks, 8, 32]
    return _ref_k_quant(blocks, low | (high << 4))


def _ref_q6_k(blocks):
    """ql[128] @0 | qh[64] @128 | scales int8[16] @192 | d fp16 @208, in two halves h of 128 elements:
    ql byte 64h + i holds the low 4 bits of elements 128h + i (low nibble) and 128h + 64 + i (high nibble);
    qh byte 32h + i holds the top 2 bits of elements 128h + 32k + i in its bits 2k, 2k + 1;
    element e = (d * scales[e // 16]) * (q - 32)."""
    low = _nibbles(blocks[..., 0:128].unflatten(-1, (2, 64))).flatten(-2)  # [N, n_blocks, 256]
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=blocks.device)[:, None]  # [4, 1]
    high = ((blocks[..., 128:192].unflatten(-1, (2, 1, 32)) >> shifts) & 3).flatten(-3)  # [N, n_blocks, 256]
    q = ((low | (high << 4)).to(torch.int8) - 32).unflatten(-1, (16, 16))  # [N, n_blocks, 16, 16]
    d = (_f16(blocks, 208) * _field(blocks, 192, 208, torch.int8).float())[..., None]  # [N, n_blocks, 16, 1]
    return d * q.float()


_REFERENCES = {
    "F32": _ref_f32, "F16": _ref_f16, "BF16": _ref_bf16, "Q8_0": _ref_q8_0, "Q4_0": _ref_q4_0, "Q4_1": _ref_q4_1,
    "Q5_0": _ref_q5_0, "Q5_1": _ref_q5_1, "Q4_K": _ref_q4_k, "Q5_K": _ref_q5_k, "Q6_K": _ref_q6_k,
}


def reference(data: torch.Tensor, qtype, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """data uint8 [N, row_bytes] (or [row_bytes]) of qtype (a code, name or QuantType) -> [N, K] (or [K])."""
    qt = quant_type(qtype)
    assert data.dtype == torch.uint8
    rows = data.reshape(-1, data.shape[-1])  # [N, row_bytes]
    N, K = rows.shape[0], qt.row_elems(rows.shape[1])
    blocks = rows.reshape(N, K // qt.block_elems, qt.block_bytes)  # [N, n_blocks, block_bytes]
    out = _REFERENCES[qt.name](blocks).reshape(N, K).to(out_dtype)  # [N, K]
    return out.reshape(data.shape[:-1] + (K,))


def _roundf(x: torch.Tensor) -> torch.Tensor:
    """C's roundf (halves away from zero), as ggml rounds: sign(x) * (floor(|x|) + floor(2 (|x| - floor(|x|))))."""
    a = x.abs()
    floored = a.floor()
    return x.sign() * (floored + (2 * (a - floored)).floor())


def quantize(weight: torch.Tensor, qtype) -> torch.Tensor:
    """Round-to-nearest quantization of weight [N, K] into Q8_0 or Q4_0 blocks (symmetric: an absmax scale per 32
    elements, fp16) or Q4_1 blocks (a scale and a minimum per 32), on weight's device: uint8 [N, row_bytes], bit
    for bit what gguf-py's quantize (ggml's reference quantizer) writes for the same float32 values."""
    qt = quant_type(qtype)
    N, K = weight.shape
    assert qt.name in ("Q8_0", "Q4_0", "Q4_1") and K % qt.block_elems == 0
    blocks = weight.float().reshape(N, K // 32, 32)
    offsets = []  # Q4_1's minima, after the scales
    if qt.name == "Q8_0":  # d = absmax / 127, q = roundf(x / d)
        d = blocks.abs().amax(-1, keepdim=True) / 127
        qs = _roundf(blocks * torch.where(d == 0, 0.0, 1 / d)).to(torch.int8).view(torch.uint8)
    else:
        if qt.name == "Q4_0":  # d = the value of largest magnitude / -8, q = trunc(x / d + 8.5) in 0..15
            d = blocks.gather(-1, blocks.abs().argmax(-1, keepdim=True)) / -8
            q = blocks * torch.where(d == 0, 0.0, 1 / d) + 8.5
        else:  # d = (max - min) / 15, q = trunc((x - min) / d + 0.5) in 0..15
            low = blocks.amin(-1, keepdim=True)
            d = (blocks.amax(-1, keepdim=True) - low) / 15
            q = (blocks - low) * torch.where(d == 0, 0.0, 1 / d) + 0.5
            offsets = [low.half().view(torch.uint8)]
        q = q.trunc().clamp(0, 15).to(torch.uint8)
        qs = q[..., :16] | (q[..., 16:] << 4)  # two a byte: elements i and 16 + i
    return torch.cat([d.half().view(torch.uint8), *offsets, qs], -1).reshape(N, -1)


SCALE_OFFSETS = {"Q8_0": (0,), "Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q4_K": (0, 2),
                 "Q5_K": (0, 2), "Q6_K": (208,)}  # where each block's fp16 scales (d, and a min) sit


def random_blocks(qtype, rows: int, cols: int, device: torch.device, std: float = 0.02,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Valid random blocks for a [rows, cols] weight (benchmarks at real shapes, GPU tests): random quants under fp16
    scales drawn so that the values' standard deviation is about `std` (they are linear in the scales), uint8
    [rows, row_bytes] on device."""
    qt = quant_type(qtype)
    assert cols % qt.block_elems == 0, f"{cols} columns are not whole {qt.name} blocks"
    n_blocks = cols // qt.block_elems
    blocks = torch.randint(0, 256, (rows, n_blocks, qt.block_bytes), dtype=torch.uint8, device=device,
                           generator=generator)
    # scales (and mins) of either sign: the values centre on 0, as a trained model's do
    scales = [torch.rand(rows, n_blocks, 1, device=device, generator=generator) * 2 - 1 for _ in SCALE_OFFSETS[qt.name]]
    for at, d in zip(SCALE_OFFSETS[qt.name], scales):
        blocks[..., at:at + 2] = d.half().view(torch.uint8)
    sample = reference(blocks[:64].reshape(min(rows, 64), -1), qt)
    factor = std / max(sample.std().item(), 1e-12)
    for at, d in zip(SCALE_OFFSETS[qt.name], scales):
        blocks[..., at:at + 2] = (d * factor).half().view(torch.uint8)
    return blocks.reshape(rows, -1)


SCALE_MOVED_FROM = {"Q8_0": 0, "Q6_K": 208}  # the types whose kernel layout moves d, and where a block holds it
CHUNKED = ("Q4_K", "Q5_K", "Q6_K")  # the types whose kernel layout stores a row's block bodies by 16-byte chunks
CHUNK = 16  # bytes


def _body_bytes(qt: QuantType) -> int:
    """The bytes of a block that stay in place in the kernel layout (all but a moved d)."""
    return qt.block_bytes - (2 if qt.name in SCALE_MOVED_FROM else 0)


def to_kernel_layout(data: torch.Tensor, qtype) -> torch.Tensor:
    """Blocks uint8 [N, row_bytes] in the file's layout -> the kernel layout (new, same shape):
    - Q8_0 and Q6_K: a row becomes its blocks without their d (32 and 208 bytes each: their quants 4-byte aligned),
      then the blocks' d in block order;
    - Q4_K, Q5_K and Q6_K: a row's block bodies (144, 176, 208 bytes) are stored chunk-major: chunk c (bytes
      16c .. 16c + 15 of a body) of block b at 16 (c n_blocks + b). Threads that take consecutive blocks of a row
      then read one contiguous run per load, where the blocks' own strides left each 16-byte load its own cache line;
    other types are returned as they are."""
    qt = quant_type(qtype)
    at = SCALE_MOVED_FROM.get(qt.name)
    if at is None and qt.name not in CHUNKED:
        return data
    N = data.shape[0]
    blocks = data.reshape(N, -1, qt.block_bytes)  # [N, n_blocks, block_bytes]
    body = blocks if at is None else torch.cat([blocks[..., :at], blocks[..., at + 2:]], dim=-1)  # [N, n_blocks, B]
    if qt.name in CHUNKED:
        body = body.reshape(N, body.shape[1], -1, CHUNK).transpose(1, 2)  # [N, B / 16, n_blocks, 16]
    moved = [] if at is None else [blocks[..., at:at + 2].flatten(1)]
    return torch.cat([body.flatten(1)] + moved, dim=1)


def from_kernel_layout(data: torch.Tensor, qtype) -> torch.Tensor:
    """The inverse of to_kernel_layout."""
    qt = quant_type(qtype)
    at = SCALE_MOVED_FROM.get(qt.name)
    if at is None and qt.name not in CHUNKED:
        return data
    N, row_bytes = data.shape
    n_blocks = row_bytes // qt.block_bytes
    body_bytes = _body_bytes(qt)
    body = data[:, :n_blocks * body_bytes]
    if qt.name in CHUNKED:
        body = body.reshape(N, body_bytes // CHUNK, n_blocks, CHUNK).transpose(1, 2)  # [N, n_blocks, B / 16, 16]
    body = body.reshape(N, n_blocks, body_bytes)
    if at is None:
        return body.reshape(N, row_bytes).contiguous()
    d = data[:, n_blocks * body_bytes:].reshape(N, n_blocks, 2)
    return torch.cat([body[..., :at], d, body[..., at:]], dim=-1).reshape(N, row_bytes)


# ---------------------------------------------------------------------------------------------------------------
# Triton decoders, of the kernel layout. Each takes w_ptr (uint8), row_off [BLOCK_N] int64 byte offsets of the rows,
# block (the first block index decoded, the same for every row), row_mask [BLOCK_N], NB (constexpr, a power of two:
# blocks per call) and n_blocks (a row's blocks: where Q8_0's and Q6_K's scales begin). Blocks block .. block +
# NB - 1 must lie in the row (a caller whose row length is no multiple of NB blocks walks the rest with NB=1);
# masked rows decode to zeros. Each returns the values in two halves, as the bytes hold
# them (a byte's low and high nibbles; Q8_0's first and last blocks), with each value's element index relative
# to block * block_elems:
#     low fp32 [BLOCK_N, NB, ...], low_cols int32 [1, NB, ...], high fp32 and high_cols of the same shapes.
# The halves keep the shapes the loads give: merging them (tl.interleave, tl.reshape) costs a layout conversion
# through shared memory per step, which made the GEMV up to 2.5x slower on an H200 (BENCHMARKS.md), and an
# interleaved decode of several blocks summed wrong there.


@triton.jit
def _load(base, offsets, mask, dtype: tl.constexpr):
    """dtype values at byte offsets from base (uint8 pointers), read little-endian; 0 where mask is false."""
    return tl.load((base + offsets).to(tl.pointer_type(dtype)), mask=mask, other=0)


@triton.jit
def _blocks32(w_ptr, row_off, block, row_mask, NB: tl.constexpr, BYTES: tl.constexpr):
    """For the 32-element types: the blocks' base pointers [BLOCK_N, NB, 1], row mask [BLOCK_N, 1, 1], byte index
    i [1, 1, 16] of the 16 quant bytes and the element index of each one's low nibble [1, NB, 16]."""
    j = tl.arange(0, NB)[None, :, None]  # [1, NB, 1]
    i = tl.arange(0, 16)[None, None, :]  # [1, 1, 16]
    base = w_ptr + row_off[:, None, None] + (block + j) * BYTES  # [BLOCK_N, NB, 1]
    return base, row_mask[:, None, None], i, j * 32 + i


@triton.jit
def decode_q8_0(w_ptr, row_off, block, row_mask, NB: tl.constexpr, n_blocks):
    # Kernel layout: block b's qs int8[32] at 32 b, its d fp16 at 32 n_blocks + 2 b: element i = qs[i] * d.
    # Halves: the first and the last NB / 2 blocks, each block's quants one 32-byte run (read so, the GEMV ran up to
    # 1.7x faster than reading 16 + 16 bytes); for NB = 1 the block's first and last 16 quants.
    HALF: tl.constexpr = NB // 2 if NB > 1 else 1  # blocks in a half
    WIDTH: tl.constexpr = 32 if NB > 1 else 16  # quants of a block in a half
    HIGH: tl.constexpr = HALF if NB > 1 else 0  # blocks from a low quant's to its high partner's
    j = tl.arange(0, HALF)[None, :, None]  # [1, HALF, 1]
    i = tl.arange(0, WIDTH)[None, None, :]  # [1, 1, WIDTH]
    row = w_ptr + row_off[:, None, None]  # [BLOCK_N, 1, 1]
    mask = row_mask[:, None, None]
    d_low = _load(row, 32 * n_blocks + 2 * (block + j), mask, tl.float16).to(tl.float32)  # [BLOCK_N, HALF, 1]
    d_high = _load(row, 32 * n_blocks + 2 * (block + j + HIGH), mask, tl.float16).to(tl.float32)
    low = _load(row, 32 * (block + j) + i, mask, tl.int8).to(tl.float32)  # [BLOCK_N, HALF, WIDTH]
    high = _load(row, 32 * (block + j + HIGH) + (0 if NB > 1 else 16) + i, mask, tl.int8).to(tl.float32)
    col = j * 32 + i  # [1, HALF, WIDTH]
    return low * d_low, col, high * d_high, col + (HALF * 32 if NB > 1 else 16)


@triton.jit
def decode_q4_0(w_ptr, row_off, block, row_mask, NB: tl.constexpr, n_blocks):
    # d fp16 @0 | qs[16] @2: byte i holds elements i (low nibble) and 16 + i (high nibble); d * (q - 8)
    base, mask, i, col = _blocks32(w_ptr, row_off, block, row_mask, NB, 18)
    d = _load(base, 0, mask, tl.float16).to(tl.float32)  # [BLOCK_N, NB, 1]
    qs = _load(base, 2 + i, mask, tl.uint8).to(tl.int32)  # [BLOCK_N, NB, 16]
    return d * ((qs & 15) - 8).to(tl.float32), col, d * ((qs >> 4) - 8).to(tl.float32), col + 16


@triton.jit
def decode_q4_1(w_ptr, row_off, block, row_mask, NB: tl.constexpr, n_blocks):
    # d fp16 @0 | m fp16 @2 | qs[16] @4 (as Q4_0): d * q + m
    base, mask, i, col = _blocks32(w_ptr, row_off, block, row_mask, NB, 20)
    d = _load(base, 0, mask, tl.float16).to(tl.float32)  # [BLOCK_N, NB, 1]
    m = _load(base, 2, mask, tl.float16).to(tl.float32)
    qs = _load(base, 4 + i, mask, tl.uint8).to(tl.int32)  # [BLOCK_N, NB, 16]
    return d * (qs & 15).to(tl.float32) + m, col, d * (qs >> 4).to(tl.float32) + m, col + 16


@triton.jit
def decode_q5_0(w_ptr, row_off, block, row_mask, NB: tl.constexpr, n_blocks):
    # d fp16 @0 | qh u32 @2: bit i is bit 4 of element i | qs[16] @6 (as Q4_0): d * (q - 16).
    # qh is only 2-byte aligned: read as two u16, the top bits of elements 0-15 and of elements 16-31.
    base, mask, i, col = _blocks32(w_ptr, row_off, block, row_mask, NB, 22)
    d = _load(base, 0, mask, tl.float16).to(tl.float32)  # [BLOCK_N, NB, 1]
    qh_low = _load(base, 2, mask, tl.uint16).to(tl.int32)  # [BLOCK_N, NB, 1]
    qh_high = _load(base, 4, mask, tl.uint16).to(tl.int32)
    qs = _load(base, 6 + i, mask, tl.uint8).to(tl.int32)  # [BLOCK_N, NB, 16]
    low = (qs & 15) | (((qh_low >> i) & 1) << 4)
    high = (qs >> 4) | (((qh_high >> i) & 1) << 4)
    return d * (low - 16).to(tl.float32), col, d * (high - 16).to(tl.float32), col + 16


@triton.jit
def decode_q5_1(w_ptr, row_off, block, row_mask, NB: tl.constexpr, n_blocks):
    # d fp16 @0 | m fp16 @2 | qh u32 @4 | qs[16] @8 (as Q5_0): d * q + m.
    # qh is read as an int32: the arithmetic shift's sign bits never reach the bit kept by & 1.
    base, mask, i, col = _blocks32(w_ptr, row_off, block, row_mask, NB, 24)
    d = _load(base, 0, mask, tl.float16).to(tl.float32)  # [BLOCK_N, NB, 1]
    m = _load(base, 2, mask, tl.float16).to(tl.float32)
    qh = _load(base, 4, mask, tl.int32)  # [BLOCK_N, NB, 1]
    qs = _load(base, 8 + i, mask, tl.uint8).to(tl.int32)  # [BLOCK_N, NB, 16]
    low = (qs & 15) | (((qh >> i) & 1) << 4)
    high = (qs >> 4) | (((qh >> (i + 16)) & 1) << 4)
    return d * low.to(tl.float32) + m, col, d * high.to(tl.float32) + m, col + 16


@triton.jit
def _chunked(base, offset, n_blocks):
    """In a chunked row (see to_kernel_layout), the pointer to byte `offset` of the body of the block whose first
    chunk is at base."""
    return base + offset // 16 * (16 * n_blocks) + offset % 16


@triton.jit
def _blocks256(w_ptr, row_off, block, row_mask, NB: tl.constexpr, n_blocks):
    """For Q4_K/Q5_K (chunked rows): the blocks' first chunks [BLOCK_N, NB, 1, 1], row mask [BLOCK_N, 1, 1, 1], group
    g [1, 1, 4, 1] and byte i [1, 1, 1, 32] of the 4 groups of 32 quant bytes, each group's pair of (d * scale,
    dmin * min) of its low-nibble sub-block 2g and high-nibble sub-block 2g + 1 [BLOCK_N, NB, 4, 1], and the
    element index of each byte's low nibble, 64g + i [1, NB, 4, 32]."""
    j = tl.arange(0, NB)[None, :, None, None]  # [1, NB, 1, 1]
    g = tl.arange(0, 4)[None, None, :, None]  # [1, 1, 4, 1]
    i = tl.arange(0, 32)[None, None, None, :]  # [1, 1, 1, 32]
    base = w_ptr + row_off[:, None, None, None] + (block + j) * 16  # [BLOCK_N, NB, 1, 1]
    mask = row_mask[:, None, None, None]
    d = _load(base, 0, mask, tl.float16).to(tl.float32)  # [BLOCK_N, NB, 1, 1]
    dmin = _load(base, 2, mask, tl.float16).to(tl.float32)
    d_low, m_low, d_high, m_high = _k_pair_scales(d, dmin, _load(base, 4, mask, tl.int32),
                                                  _load(base, 8, mask, tl.int32), _load(base, 12, mask, tl.int32), g)
    return base, mask, g, i, d_low, m_low, d_high, m_high, j * 256 + g * 64 + i


@triton.jit
def _k_pair_scales(d, dmin, s, m, low, g):
    """Q4_K/Q5_K: of sub-blocks 2g and 2g + 1 (g in 0..3), (d * scale, dmin * min) of each, from the block's d and
    dmin (fp32) and its 12 scale bytes as three int32 words (4-byte aligned in blocks of 144 and 176 bytes): s, the
    low 6 bits of scales 0-3; m, of mins 0-3; low, the low 4 bits of scales 4-7 (low nibbles) and mins 4-7 (high
    nibbles). Decoded 4 bytes at a time as _k_scales does one by one; the shifts are arithmetic (int32), and every
    mask clears the sign bits they bring."""
    scales = tl.where(g < 2, s & 0x3F3F3F3F, (low & 0x0F0F0F0F) | ((s >> 2) & 0x30303030))
    mins = tl.where(g < 2, m & 0x3F3F3F3F, ((low >> 4) & 0x0F0F0F0F) | ((m >> 2) & 0x30303030))
    shift = 16 * (g % 2)  # sub-block 2g is byte 2g % 4 of its word, 2g + 1 the byte after it
    return (d * ((scales >> shift) & 0xFF).to(tl.float32), dmin * ((mins >> shift) & 0xFF).to(tl.float32),
            d * ((scales >> (shift + 8)) & 0xFF).to(tl.float32), dmin * ((mins >> (shift + 8)) & 0xFF).to(tl.float32))


@triton.jit
def decode_q4_k(w_ptr, row_off, block, row_mask, NB: tl.constexpr, n_blocks):
    # d fp16 @0 | dmin fp16 @2 | 8 six-bit (scale, min) pairs @4 (see _k_scales) | qs[128] @16: byte 32g + i holds
    # elements 64g + i (low nibble, sub-block 2g) and 64g + 32 + i (high nibble, sub-block 2g + 1);
    # element = (d * scale) * q - dmin * min
    base, mask, g, i, d_low, m_low, d_high, m_high, col = _blocks256(w_ptr, row_off, block, row_mask, NB, n_blocks)
    qs = _load(_chunked(base, 16 + g * 32 + i, n_blocks), 0, mask, tl.uint8).to(tl.int32)  # [BLOCK_N, NB, 4, 32]
    return d_low * (qs & 15).to(tl.float32) - m_low, col, d_high * (qs >> 4).to(tl.float32) - m_high, col + 32


@triton.jit
def decode_q5_k(w_ptr, row_off, block, row_mask, NB: tl.constexpr, n_blocks):
    # as Q4_K, with qh[32] @16: bit k of byte i is bit 4 of element 32k + i, so bits 2g and 2g + 1 of byte i
    # belong to qs byte 32g + i's low and high nibble | qs[128] @48
    base, mask, g, i, d_low, m_low, d_high, m_high, col = _blocks256(w_ptr, row_off, block, row_mask, NB, n_blocks)
    qh = _load(_chunked(base, 16 + i, n_blocks), 0, mask, tl.uint8).to(tl.int32)  # [BLOCK_N, NB, 1, 32]
    qs = _load(_chunked(base, 48 + g * 32 + i, n_blocks), 0, mask, tl.uint8).to(tl.int32)  # [BLOCK_N, NB, 4, 32]
    q_low = (qs & 15) | (((qh >> (2 * g)) & 1) << 4)
    q_high = (qs >> 4) | (((qh >> (2 * g + 1)) & 1) << 4)
    return d_low * q_low.to(tl.float32) - m_low, col, d_high * q_high.to(tl.float32) - m_high, col + 32


@triton.jit
def decode_q6_k(w_ptr, row_off, block, row_mask, NB: tl.constexpr, n_blocks):
    # ql[128] @0 | qh[64] @128 | scales int8[16] @192 (see _ref_q6_k): block b's body, chunked (its first chunk at
    # 16 b), its d fp16 at 208 n_blocks + 2 b (the kernel layout). ql is read as 8 runs u of 16
    # bytes, u = 4h + 2k + t: byte 16u + i holds elements e = 128h + 32k + 16t + i (low nibble) and e + 64 (high
    # nibble), whose top 2 bits are bits 2k (and 2k + 4) of qh byte 32h + 16t + i (each qh run is read twice, for
    # k = 0 and 1), and whose scales are scales[e // 16] = scales[8h + 2k + t] (and scales[8h + 4 + 2k + t]).
    j = tl.arange(0, NB)[None, :, None, None]  # [1, NB, 1, 1]
    u = tl.arange(0, 8)[None, None, :, None]  # [1, 1, 8, 1]
    i = tl.arange(0, 16)[None, None, None, :]  # [1, 1, 1, 16]
    h, k, t = u // 4, (u // 2) % 2, u % 2
    base = w_ptr + row_off[:, None, None, None] + (block + j) * 16  # [BLOCK_N, NB, 1, 1]
    mask = row_mask[:, None, None, None]
    d = _load(w_ptr + row_off[:, None, None, None], 208 * n_blocks + 2 * (block + j), mask, tl.float16).to(tl.float32)
    scales = _chunked(base, 192 + 8 * h + 2 * k + t, n_blocks)
    d_low = d * _load(scales, 0, mask, tl.int8).to(tl.float32)  # [BLOCK_N, NB, 8, 1]
    d_high = d * _load(scales, 4, mask, tl.int8).to(tl.float32)
    ql = _load(_chunked(base, 16 * u + i, n_blocks), 0, mask, tl.uint8).to(tl.int32)  # [BLOCK_N, NB, 8, 16]
    qh = _load(_chunked(base, 128 + 32 * h + 16 * t + i, n_blocks), 0, mask, tl.uint8).to(tl.int32)
    q_low = ((ql & 15) | (((qh >> (2 * k)) & 3) << 4)) - 32
    q_high = ((ql >> 4) | (((qh >> (2 * k + 4)) & 3) << 4)) - 32
    col = j * 256 + 128 * h + 32 * k + 16 * t + i  # [1, NB, 8, 16]
    return d_low * q_low.to(tl.float32), col, d_high * q_high.to(tl.float32), col + 64


@triton.jit
def decode(w_ptr, row_off, block, row_mask, QTYPE: tl.constexpr, NB: tl.constexpr, n_blocks):
    """decode_<QTYPE>, QTYPE the name of a QuantType with blocks (block_elems > 1)."""
    if QTYPE == "Q8_0":
        return decode_q8_0(w_ptr, row_off, block, row_mask, NB, n_blocks)
    elif QTYPE == "Q4_0":
        return decode_q4_0(w_ptr, row_off, block, row_mask, NB, n_blocks)
    elif QTYPE == "Q4_1":
        return decode_q4_1(w_ptr, row_off, block, row_mask, NB, n_blocks)
    elif QTYPE == "Q5_0":
        return decode_q5_0(w_ptr, row_off, block, row_mask, NB, n_blocks)
    elif QTYPE == "Q5_1":
        return decode_q5_1(w_ptr, row_off, block, row_mask, NB, n_blocks)
    elif QTYPE == "Q4_K":
        return decode_q4_k(w_ptr, row_off, block, row_mask, NB, n_blocks)
    elif QTYPE == "Q5_K":
        return decode_q5_k(w_ptr, row_off, block, row_mask, NB, n_blocks)
    else:
        tl.static_assert(QTYPE == "Q6_K")
        return decode_q6_k(w_ptr, row_off, block, row_mask, NB, n_blocks)


@triton.jit
def flat(values, cols):
    """A decoded half [BLOCK_N, NB, ...] and its cols [1, NB, ...] as [BLOCK_N, E] and [E] (for tl.dot and 2-D
    stores; a layout conversion)."""
    ELEMS: tl.constexpr = cols.numel
    return tl.reshape(values, [values.shape[0], ELEMS]), tl.reshape(cols, [ELEMS])


@triton.jit
def _dequantize_kernel(w_ptr, rows_ptr, out_ptr, N, row_bytes, K, QTYPE: tl.constexpr,
                       BLOCK_ELEMS: tl.constexpr, GATHER: tl.constexpr, BLOCK_N: tl.constexpr, NB: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N] output rows
    row_mask = rows < N
    src = rows  # [BLOCK_N] weight rows
    if GATHER:
        src = tl.load(rows_ptr + rows, mask=row_mask, other=0)
    block = tl.program_id(1) * NB
    low, low_cols, high, high_cols = decode(w_ptr, src.to(tl.int64) * row_bytes, block, row_mask, QTYPE, NB,
                                           K // BLOCK_ELEMS)
    out = out_ptr + rows.to(tl.int64)[:, None] * K + block * BLOCK_ELEMS  # [BLOCK_N, 1]
    _store_half(out, low, low_cols, row_mask)
    _store_half(out, high, high_cols, row_mask)


@triton.jit
def _store_half(out, values, cols, row_mask):
    values, cols = flat(values, cols)  # [BLOCK_N, E], [E]
    tl.store(out + cols[None, :], values.to(out.dtype.element_ty), mask=row_mask[:, None])


def dequantize(data: torch.Tensor, qtype, out_dtype: torch.dtype = torch.float32, rows: torch.Tensor | None = None,
               block_n: int = 4, tile_elems: int = 1024) -> torch.Tensor:
    """`reference` of data uint8 [N, row_bytes] (contiguous, in the kernel layout) of a type with blocks, or of its
    rows `rows` (int64 [R], for embedding lookups) -> [N or R, K] out_dtype. A program decodes block_n rows of up
    to tile_elems elements: the most blocks, a power of two, that divide the row and fit."""
    qt = quant_type(qtype)
    assert data.dtype == torch.uint8 and data.dim() == 2 and data.is_contiguous() and qt.block_elems > 1
    assert rows is None or (rows.dtype == torch.int64 and rows.dim() == 1)
    N, row_bytes = data.shape
    K = qt.row_elems(row_bytes)
    n_blocks = K // qt.block_elems
    nb = min(n_blocks & -n_blocks, max(1, tile_elems // qt.block_elems))  # lowest set bit: largest 2^i dividing it
    n_out = N if rows is None else rows.numel()
    out = torch.empty(n_out, K, dtype=out_dtype, device=data.device)  # [n_out, K]
    grid = (triton.cdiv(n_out, block_n), n_blocks // nb)
    _dequantize_kernel[grid](data, data if rows is None else rows, out, n_out, row_bytes, K, QTYPE=qt.name,
                             BLOCK_ELEMS=qt.block_elems, GATHER=rows is not None, BLOCK_N=block_n, NB=nb)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Integer dot products (the one-row GEMV of Q4_K, Q5_K, Q6_K and Q8_0, as llama.cpp's MMVQ): x is rounded to 8 bits per
# 32 elements once per layer (`round_x`), and each 32-bit word of quants meets 4 bytes of x in one dp4a (4 int8
# products summed into an int32) instead of being decoded to floats. The result is exactly the weights' values
# (`reference`) times x_hat (`round_x_reference`), up to the order of the fp32 sums: the integer sums are exact,
# and each block's scales multiply them in fp32.

DOT_TYPES = ("Q4_K", "Q5_K", "Q6_K", "Q8_0")


def round_x_reference(x: torch.Tensor) -> torch.Tensor:
    """x_hat, the values the integer dot products multiply for x [K] (K a multiple of 32): per 32 elements, the
    scale d = max|x| / 127 and x_hat = d * q, q = v rounded to nearest (halves up) in [-127, 127] for
    v = x * (127 / max|x|) (0 where max|x| = 0); fp32 [K]. Every operation is exactly rounded (no sum that a
    compiler could fuse with a product), so that round_x gives the same bits on any device."""
    groups = x.float().reshape(-1, 32)  # [K / 32, 32]
    amax = groups.abs().amax(-1, keepdim=True)  # [K / 32, 1]
    full = torch.full_like(amax, 127.0)  # a tensor: torch divides by a Python number, or one into it, by reciprocal
    v = groups * torch.where(amax > 0, full / amax, 0.0)
    low = torch.floor(v)
    q = torch.where(v >= low + 0.5, low + 1, low).clamp(-127, 127)
    return (q * (amax / full)).reshape(-1)


@triton.jit
def round_groups(x):
    """x fp32 [G, 2, 16] (G groups of 32, in halves) -> (q [G, 2, 16] fp32 of integers, d [G, 1, 1], d * sum(q)
    of each half [G, 2, 1]), as round_x_reference rounds: every division rounded to nearest (GPUs divide
    approximately by default), no add a compiler could fuse with a product."""
    amax = tl.max(tl.max(tl.abs(x), axis=2, keep_dims=True), axis=1, keep_dims=True)  # [G, 1, 1]
    scale = tl.math.div_rn(tl.full(amax.shape, 127.0, tl.float32), tl.where(amax > 0, amax, 1.0))
    v = x * tl.where(amax > 0, scale, 0.0)
    low = tl.floor(v)
    q = tl.minimum(tl.maximum(tl.where(v >= low + 0.5, low + 1.0, low), -127.0), 127.0)
    d = tl.math.div_rn(amax, tl.full(amax.shape, 127.0, tl.float32))
    return q, d, tl.sum(q, axis=2, keep_dims=True) * d


@triton.jit
def _round_x_kernel(x_ptr, q_ptr, d_ptr, sums_ptr, K, GATED: tl.constexpr, GROUPS: tl.constexpr,
                    PDL: tl.constexpr):
    group = tl.program_id(0) * GROUPS + tl.arange(0, GROUPS)[:, None, None]  # [GROUPS, 1, 1] groups of 32
    half = tl.arange(0, 2)[None, :, None]  # [1, 2, 1] their halves of 16
    k = group * 32 + half * 16 + tl.arange(0, 16)[None, None, :]  # [GROUPS, 2, 16]
    mask = k < K
    pdl.enter(PDL)
    x = tl.load(x_ptr + k, mask=mask, other=0.0).to(tl.float32)
    if GATED:
        up = tl.load(x_ptr + K + k, mask=mask, other=0.0).to(tl.float32)
        x = activation.silu_times(x, up).to(x_ptr.dtype.element_ty).to(tl.float32)
    q, d, sums = round_groups(x)
    tl.store(q_ptr + k, q.to(tl.int8), mask=mask)
    group_mask = group * 32 < K
    tl.store(d_ptr + group, d, mask=group_mask)
    tl.store(sums_ptr + group * 2 + half, sums, mask=group_mask)


def empty_rounded(K: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Outputs for round_x's values of a row of K: (q int8 [K], d fp32 [K / 32], sums fp32 [K / 16])."""
    return (torch.empty(K, dtype=torch.int8, device=device), torch.empty(K // 32, dtype=torch.float32, device=device),
            torch.empty(K // 16, dtype=torch.float32, device=device))


def round_x(x: torch.Tensor, gated: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [1, K] (or [1, 2K] gated: silu(gate) * up, rounded to x's dtype as the activation kernel rounds it), K a
    multiple of 32 -> (q int8 [K], d fp32 [K / 32], sums fp32 [K / 16]): x_hat = d * q per 32 elements as
    `round_x_reference`, and each 16 elements' d * sum(q) (the offsets of Q4_K's mins and Q6_K's -32)."""
    K = x.shape[-1] // (2 if gated else 1)
    assert x.shape[0] == 1 and x.stride(-1) == 1 and K % 32 == 0
    q, d, sums = empty_rounded(K, x.device)
    groups = 8
    _round_x_kernel[(triton.cdiv(K // 32, groups),)](x, q, d, sums, K, GATED=gated, GROUPS=groups, num_warps=2,
                                                     **pdl.launch(x.device))
    return q, d, sums


@triton.jit
def dp4a(a, b, c, HARDWARE: tl.constexpr):
    """c + the sum of the products of the 4 signed bytes of int32 a and b, element-wise: the GPU's dp4a
    instruction, or the same in integer ops (the CPU interpreter)."""
    if HARDWARE:
        return tl.inline_asm_elementwise("dp4a.s32.s32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, c], dtype=tl.int32,
                                         is_pure=True, pack=1)
    else:
        for i in tl.static_range(4):
            c += ((a << (24 - 8 * i)) >> 24) * ((b << (24 - 8 * i)) >> 24)
        return c


# Each dot_<type>(w_ptr, row_off, block, NB, n_blocks, xq_ptr, xd_ptr, xs_ptr, HARDWARE) returns the fp32
# partial sums [BLOCK_N, NB] of x_hat times blocks block .. block + NB - 1 of the rows, those past the row's
# n_blocks counting 0 (arguments as the decoders', row_off of rows that exist; xq_ptr, xd_ptr and xs_ptr round_x's
# q, d and sums, all as int32 words). Each thread takes a whole (row, block) and reads it 4 words at a time: every
# load is a [BLOCK_N, NB, 4] tensor of 4 consecutive words, so that all share one layout (a thread's 4 words, one
# 128-bit load) and no value moves between threads; x's words, the same for every row, are read in that shape too
# (from L1).


@triton.jit
def _dot_tile(row_off, block, NB: tl.constexpr, n_blocks, BYTES: tl.constexpr, w_ptr):
    """The addressing every dot_<type> shares, for blocks BYTES bytes apart (16 in a chunked row: its blocks'
    first chunks): (w4 [1, 1, 4], the blocks' index in the row [1, NB, 1] with those past its end clamped to its
    last (no load is masked: a clamped block's sum is dropped, an out-of-range row's never stored), the weight's
    words at the blocks' starts + w4 [BLOCK_N, NB, 4])."""
    j = tl.minimum(block + tl.arange(0, NB)[None, :, None], n_blocks - 1)  # [1, NB, 1]
    w4 = tl.arange(0, 4)[None, None, :]  # [1, 1, 4]
    words = (w_ptr + row_off).to(tl.pointer_type(tl.int32))[:, None, None] + j * (BYTES // 4) + w4
    return w4, j, words


@triton.jit
def _chunk(words, c: tl.constexpr, n_blocks):
    """For a chunked row (see to_kernel_layout) whose blocks' first chunks' words are `words` (_dot_tile with BYTES
    16): their chunk c's words."""
    return words + c * (4 * n_blocks)


@triton.jit
def _x_words(x_ptr, j, PER_BLOCK: tl.constexpr, w4, words):
    """x's words (of PER_BLOCK a block) at blocks j's starts + w4, [BLOCK_N, NB, 4] as words (the same for every
    row)."""
    return tl.broadcast_to(x_ptr + j * PER_BLOCK + w4, words.shape)


@triton.jit
def _word(words, w4, i: tl.constexpr):
    """words [..., 4] int32 (one thread's 4) -> words[..., i]: a register move once compiled."""
    return tl.sum(tl.where(w4 == i, words, 0), axis=len(words.shape) - 1)


@triton.jit
def _fp32_word(words, w4, i: tl.constexpr):
    return _word(words, w4, i).to(tl.float32, bitcast=True)


@triton.jit
def _moved_d(w_ptr, row_off, j, n_blocks, BODY: tl.constexpr):
    """The fp32 d [BLOCK_N, NB] of blocks j [1, NB] whose fp16 d the kernel layout moved to the row's end (after
    the n_blocks bodies of BODY bytes)."""
    at = w_ptr + row_off[:, None] + BODY * n_blocks + 2 * j  # [BLOCK_N, NB]
    return tl.load(at.to(tl.pointer_type(tl.float16))).to(tl.float32)


@triton.jit
def _past_the_row(total, block, NB: tl.constexpr, n_blocks):
    """total [BLOCK_N, NB] with the sums of blocks past the row's end (clamped to its last by _dot_tile) zeroed."""
    return tl.where(block + tl.arange(0, NB)[None, :] < n_blocks, total, 0.0)


@triton.jit
def dot_k_pairs(w_ptr, row_off, block, NB: tl.constexpr, n_blocks, xq_ptr, xd_ptr, xs_ptr, HARDWARE: tl.constexpr,
                FIVE_BITS: tl.constexpr):
    # Q4_K, or Q5_K with FIVE_BITS, in chunks of 4 words (chunked rows). A block's chunk 0 is [d | dmin] and the
    # three scale words (see _blocks256), Q5_K's chunks 1 and 2 its 8 qh words, then quant word 8 g + w (chunk
    # QS + 2 g + w // 4): its low nibbles are elements 64 g + 4 w .. + 3 (sub-block 2 g), its high nibbles the 32
    # after them (sub-block 2 g + 1); Q5_K's fifth bits of those are bits 2 g and 2 g + 1 of qh word w's bytes.
    # element = (d * scale) * q - dmin * min.
    QS: tl.constexpr = 3 if FIVE_BITS else 1  # the first quant chunk
    w4, j, words = _dot_tile(row_off, block, NB, n_blocks, 16, w_ptr)  # [BLOCK_N, NB, 4]
    x_words = _x_words(xq_ptr, j, 64, w4, words)
    x_d = _x_words(xd_ptr, j, 8, w4, words)  # x's d, one per 32
    x_sums = _x_words(xs_ptr, j, 16, w4, words)  # x_hat's sums, one per 16
    header = tl.load(words)
    d_and_min = _word(header, w4, 0)  # [BLOCK_N, NB]
    d = (d_and_min & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    dmin = (d_and_min >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    s, m, low = _word(header, w4, 1), _word(header, w4, 2), _word(header, w4, 3)
    if FIVE_BITS:
        qh = tl.load(_chunk(words, 1, n_blocks)), tl.load(_chunk(words, 2, n_blocks))  # qh words 0-3, 4-7
    total = tl.zeros([row_off.shape[0], NB], dtype=tl.float32)
    for g in tl.static_range(4):
        d_low, m_low, d_high, m_high = _k_pair_scales(d, dmin, s, m, low, g)  # [BLOCK_N, NB]
        xd = tl.load(x_d + 4 * (g // 2))  # x's d of sub-blocks 4 (g // 2) .. + 3
        xs = tl.load(x_sums + 4 * g)  # the sums of sub-block 2g's 16s, then 2g + 1's
        sum_low = tl.zeros(header.shape, dtype=tl.int32)
        sum_high = tl.zeros(header.shape, dtype=tl.int32)
        for half in tl.static_range(2):
            q = tl.load(_chunk(words, QS + 2 * g + half, n_blocks))  # [BLOCK_N, NB, 4]
            q_low, q_high = q & 0x0F0F0F0F, (q >> 4) & 0x0F0F0F0F
            if FIVE_BITS:
                q_low |= ((qh[half] >> (2 * g)) & 0x01010101) << 4
                q_high |= ((qh[half] >> (2 * g + 1)) & 0x01010101) << 4
            sum_low = dp4a(q_low, tl.load(x_words + 16 * g + 4 * half), sum_low, HARDWARE)
            sum_high = dp4a(q_high, tl.load(x_words + 16 * g + 8 + 4 * half), sum_high, HARDWARE)
        # dot = d * scale * (x's d * sum(q * x's q)) - dmin * min * sum(x_hat), per sub-block
        total += (d_low * _fp32_word(xd, w4, 2 * g % 4) * tl.sum(sum_low, axis=2).to(tl.float32)
                  - m_low * (_fp32_word(xs, w4, 0) + _fp32_word(xs, w4, 1))
                  + d_high * _fp32_word(xd, w4, 2 * g % 4 + 1) * tl.sum(sum_high, axis=2).to(tl.float32)
                  - m_high * (_fp32_word(xs, w4, 2) + _fp32_word(xs, w4, 3)))
    return _past_the_row(total, block, NB, n_blocks)  # [BLOCK_N, NB]


@triton.jit
def dot_q6_k(w_ptr, row_off, block, NB: tl.constexpr, n_blocks, xq_ptr, xd_ptr, xs_ptr,
             HARDWARE: tl.constexpr):
    # Kernel layout, in chunks of 4 words (chunked rows): a block's ql in chunks 0-7, qh in 8-11, its 16 int8 scales
    # in 12 (d at the row's end). Run u = 4h + 2k + t (of decode_q6_k) is ql chunk u's words w, whose low nibbles are
    # elements
    # e = 128h + 32k + 16t + 4w .. + 3 and high nibbles e + 64, their top 2 bits in bits 2k (and 2k + 4) of qh word
    # 8h + 4t + w's bytes (chunk 8 + 2h + t); the 16 from e (and e + 64) have scale 8h + 2k + t (and that + 4).
    # element = (d * scale) * (q - 32).
    w4, j, words = _dot_tile(row_off, block, NB, n_blocks, 16, w_ptr)  # [BLOCK_N, NB, 4]
    x_words = _x_words(xq_ptr, j, 64, w4, words)
    x_d = _x_words(xd_ptr, j, 8, w4, words)  # x's d, one per 32
    x_sums = _x_words(xs_ptr, j, 16, w4, words)  # x_hat's sums, one per 16
    scale_words = tl.load(_chunk(words, 12, n_blocks))  # [BLOCK_N, NB, 4]
    total = tl.zeros([row_off.shape[0], NB], dtype=tl.float32)
    for h in tl.static_range(2):
        xd = tl.load(x_d + 4 * h)  # x's d of the 32s 4h .. 4h + 3
        xs_low = tl.load(x_sums + 8 * h)  # x_hat's sums of the 16s 8h .. 8h + 3
        xs_high = tl.load(x_sums + 8 * h + 4)  # .. and of the 4 after them
        for t in tl.static_range(2):
            qh = tl.load(_chunk(words, 8 + 2 * h + t, n_blocks))  # [BLOCK_N, NB, 4]
            for k in tl.static_range(2):
                ql = tl.load(_chunk(words, 4 * h + 2 * k + t, n_blocks))
                q_low = (ql & 0x0F0F0F0F) | (((qh >> (2 * k)) & 0x03030303) << 4)  # 4 quants 0..63
                q_high = ((ql >> 4) & 0x0F0F0F0F) | (((qh >> (2 * k + 4)) & 0x03030303) << 4)
                at = 32 * h + 8 * k + 4 * t  # x's word of element e
                x_low = tl.load(x_words + at)
                x_high = tl.load(x_words + at + 16)
                zero = tl.zeros(ql.shape, dtype=tl.int32)
                sum_low = tl.sum(dp4a(q_low, x_low, zero, HARDWARE), axis=2).to(tl.float32)  # [BLOCK_N, NB]
                sum_high = tl.sum(dp4a(q_high, x_high, zero, HARDWARE), axis=2).to(tl.float32)
                sub = 8 * h + 2 * k + t  # the 16s' index in the block, and their scale's
                scale_low = _word(scale_words, w4, sub // 4)  # int8 scale sub is byte sub % 4 of word sub // 4
                scale_low = ((scale_low << (24 - 8 * (sub % 4))) >> 24).to(tl.float32)
                scale_high = _word(scale_words, w4, (sub + 4) // 4)
                scale_high = ((scale_high << (24 - 8 * (sub % 4))) >> 24).to(tl.float32)
                # dot = d * scale * (x's d * sum(q * x's q) - 32 * sum(x_hat)), per 16
                total += (scale_low * (_fp32_word(xd, w4, k) * sum_low - 32.0 * _fp32_word(xs_low, w4, 2 * k + t))
                          + scale_high * (_fp32_word(xd, w4, k + 2) * sum_high
                                          - 32.0 * _fp32_word(xs_high, w4, 2 * k + t)))
    d = _moved_d(w_ptr, row_off, tl.reshape(j, [1, NB]), n_blocks, 208)
    return _past_the_row(d * total, block, NB, n_blocks)  # [BLOCK_N, NB]


@triton.jit
def dot_q8_0(w_ptr, row_off, block, NB: tl.constexpr, n_blocks, xq_ptr, xd_ptr, xs_ptr,
             HARDWARE: tl.constexpr):
    # Kernel layout, as 32-bit words: a block's quants are its 8 words (its d the fp16 at byte 32 n_blocks + 2 b)
    w4, j, words = _dot_tile(row_off, block, NB, n_blocks, 32, w_ptr)  # [BLOCK_N, NB, 4]
    x_words = _x_words(xq_ptr, j, 8, w4, words)
    total = dp4a(tl.load(words), tl.load(x_words), tl.zeros(words.shape, dtype=tl.int32), HARDWARE)
    total = tl.sum(dp4a(tl.load(words + 4), tl.load(x_words + 4), total, HARDWARE), axis=2)  # [BLOCK_N, NB]
    j = tl.reshape(j, [1, NB])
    xd = tl.load(xd_ptr.to(tl.pointer_type(tl.float32)) + j)  # [1, NB]
    d = _moved_d(w_ptr, row_off, j, n_blocks, 32)
    return _past_the_row(d * xd * total.to(tl.float32), block, NB, n_blocks)  # [BLOCK_N, NB]


@triton.jit
def dot(w_ptr, row_off, block, QTYPE: tl.constexpr, NB: tl.constexpr, n_blocks, xq_ptr, xd_ptr, xs_ptr,
        HARDWARE: tl.constexpr):
    """dot_<QTYPE> (dot_k_pairs for Q4_K and Q5_K), QTYPE one of DOT_TYPES."""
    if QTYPE == "Q4_K" or QTYPE == "Q5_K":
        return dot_k_pairs(w_ptr, row_off, block, NB, n_blocks, xq_ptr, xd_ptr, xs_ptr, HARDWARE, QTYPE == "Q5_K")
    elif QTYPE == "Q6_K":
        return dot_q6_k(w_ptr, row_off, block, NB, n_blocks, xq_ptr, xd_ptr, xs_ptr, HARDWARE)
    else:
        tl.static_assert(QTYPE == "Q8_0")
        return dot_q8_0(w_ptr, row_off, block, NB, n_blocks, xq_ptr, xd_ptr, xs_ptr, HARDWARE)
