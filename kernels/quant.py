"""GGUF (GGML) weight blocks: the supported types and their exact dequantization in torch.

A 2-D weight of N rows of K elements stays in the file's own layout: uint8 [N, K // block_elems * block_bytes],
each row its blocks back to back (GGUF stores rows contiguously, so a tensor's raw bytes reshape to this). F32,
F16 and BF16 are "blocks" of one element, so every weight goes through the same path.

Semantics (`reference`): the float32 values gguf-py's `gguf.quants.dequantize` gives, bit for bit, computed with
the same float32 operations in the same order. Every product in these formats is exact in float32: it has at most
23 significant bits (11 of an fp16 scale, at most 12 of an integer sub-scale and quant together) and is never
subnormal (the smallest fp16 is 2^-24). So the only rounding is the final add of the offset types (Q4_1, Q5_1,
Q4_K, Q5_K), and contracting that multiply-add into an FMA, as GPU compilers do, cannot change the result.
"""

from dataclasses import dataclass

import torch

from infer.engine.errors import InferError


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
_BY_CODE = {t.code: t for t in QUANT_TYPES.values()}


def quant_type(code_or_name) -> QuantType:
    """The QuantType of a GGML type code (an int, or gguf's GGMLQuantizationType) or name such as "Q4_K"."""
    if isinstance(code_or_name, QuantType):
        return code_or_name
    found = QUANT_TYPES.get(code_or_name) if isinstance(code_or_name, str) else _BY_CODE.get(int(code_or_name))
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
