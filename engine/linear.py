"""The model's weight-holding layers: Linear (the projections) and Embedding. Each owns its weight's format, dense or
GGUF blocks (kernels/quant.py), and decides, once, which kernel runs for each shape.

Formats: a dense weight is a float tensor [out, in]; a quantized one (a GGUF's) stays in its GGML blocks, uint8
[out, row_bytes] with its QuantType, where the kernels decode the blocks in registers: on CUDA. On the CPU the
loader dequantizes it once, as it loads, to the model's dtype (the torch reference per call would cost seconds per
token).
"""

import torch
from torch import nn

from infer.kernels import activation, gemv, quant

def load_weight(data: torch.Tensor, qtype: quant.QuantType, shape: tuple[int, ...], device: torch.device,
                dtype: torch.dtype, packed: bool) -> tuple[torch.Tensor, quant.QuantType | None]:
    """A weight of `shape` from its GGML bytes data uint8 [rows, row_bytes]: (the tensor to hold, its QuantType or
    None for a dense one). Quantized types stay in their blocks when `packed`; float types, and the rest, become
    dense tensors of `dtype`."""
    if packed and qtype.block_elems > 1:
        return data.to(device), qtype
    return quant.reference(data, qtype).reshape(shape).to(device=device, dtype=dtype), None


class Linear(nn.Module):
    """y = x W^T (+ b), the parameters named as in the checkpoint (weight [out, in] or its blocks, bias [out]).

    Called as layer(x, gated, residual, residual_scale, argmax, out_dtype): x [T, in], or x = [gate | up]
    [T, 2 * in] when gated, the input then being silu(gate) * up; with a residual [T, out] the result is the new
    residual stream residual + residual_scale * y. One row on CUDA (a decode step) runs the GEMV kernel with the
    activation and the add fused (faster than cuBLAS there); it can also pack the row's argmax into `argmax` (see
    gemv.argmax_buffer) and write out_dtype (the values are rounded to x's dtype either way). A packed weight
    multiplies up to gemv.SKINNY_MAX_ROWS rows in place (speculative verification) and is dequantized for longer
    chunks; dense weights run cuBLAS (or the CPU) past one row. Past one row the result has x's dtype."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))  # [out, in], or [out, row_bytes] packed
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None  # [out]
        self.qtype: quant.QuantType | None = None  # the GGML type of a packed weight; None: dense

    def load(self, data: torch.Tensor, qtype: quant.QuantType, device: torch.device, dtype: torch.dtype,
             packed: bool) -> None:
        """Hold the weight given as GGML bytes (see load_weight)."""
        weight, self.qtype = load_weight(data, qtype, tuple(self.weight.shape), device, dtype, packed)
        self.weight = nn.Parameter(weight, requires_grad=False)

    @staticmethod
    def fused(*parts: "Linear") -> nn.Module:
        """One layer whose output is the outputs of `parts` side by side: their weights joined (one weight read, one
        launch) when they share a format, else the parts run one after the other (Concat)."""
        if len({p.qtype for p in parts}) > 1:
            return Concat(*parts)
        return Linear._of(torch.cat([p.weight for p in parts]), parts[0].qtype,
                          None if parts[0].bias is None else torch.cat([p.bias for p in parts]))

    def rows(self, ids: torch.Tensor) -> "Linear":
        """A layer with only the output rows `ids` [N] of this one (FR-Spec's pruned LM head)."""
        return Linear._of(self.weight[ids], self.qtype, None if self.bias is None else self.bias[ids])

    @staticmethod
    def _of(weight: torch.Tensor, qtype: quant.QuantType | None, bias: torch.Tensor | None) -> "Linear":
        with torch.device("meta"):
            layer = Linear(1, 1, bias=bias is not None)
        layer.weight = nn.Parameter(weight, requires_grad=False)
        layer.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        layer.qtype = qtype
        return layer

    def forward(self, x: torch.Tensor, gated: bool = False, residual: torch.Tensor | None = None,
                residual_scale: float = 1.0, argmax: torch.Tensor | None = None,
                out_dtype: torch.dtype | None = None) -> torch.Tensor:
        rows = x.shape[0]
        if x.is_cuda and rows == 1:
            return gemv.gemv(x, self.weight, self.bias, gated, residual, residual_scale, argmax, out_dtype,
                             qtype=self.qtype)
        assert argmax is None, "the argmax is packed by the one-row CUDA kernel only"
        if self.qtype is not None and rows <= gemv.SKINNY_MAX_ROWS:
            return gemv.skinny_gemm(x, self.weight, self.qtype, self.bias, gated, residual, residual_scale)
        if gated:
            x = (activation.silu_mul if x.is_cuda else activation.reference)(x)
        weight = self.weight if self.qtype is None else quant.dequantize(self.weight, self.qtype, x.dtype)
        y = nn.functional.linear(x, weight, self.bias)
        return y if residual is None else torch.add(residual, y, alpha=residual_scale)


class Concat(nn.Module):
    """Linear layers of different formats side by side (q/k/v of a Q4_K_M file, whose v rows are Q6_K): x [T, in] ->
    their outputs concatenated [T, sum of the outs]."""

    def __init__(self, *parts: Linear):
        super().__init__()
        self.parts = nn.ModuleList(parts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([part(x) for part in self.parts], dim=-1)


class Embedding(nn.Module):
    """The token embedding: weight [vocab, hidden] (or its blocks); tokens [T] -> [T, hidden]. A packed table is
    dequantized row by row as tokens look it up."""

    def __init__(self, num_embeddings: int, embedding_dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_embeddings, embedding_dim))  # [vocab, hidden], or its blocks
        self.qtype: quant.QuantType | None = None
        self.dtype: torch.dtype | None = None  # the model's dtype (Transformer.setup): a packed table's rows

    def load(self, data: torch.Tensor, qtype: quant.QuantType, device: torch.device, dtype: torch.dtype,
             packed: bool) -> None:
        weight, self.qtype = load_weight(data, qtype, tuple(self.weight.shape), device, dtype, packed)
        self.weight = nn.Parameter(weight, requires_grad=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.qtype is None:
            return nn.functional.embedding(tokens, self.weight)
        return quant.dequantize(self.weight, self.qtype, self.dtype, rows=tokens)
