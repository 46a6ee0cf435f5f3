"""The model's weight-holding layers: Linear (the projections) and Embedding. Each owns its weight's format, dense or
GGUF blocks (kernels/quant.py), and decides, once, which kernel runs for each shape.

Formats: a dense weight is a float tensor [out, in]; a quantized one (a GGUF's) stays in its GGML blocks, uint8
[out, row_bytes] with its QuantType, where the kernels decode the blocks in registers: on CUDA. On the CPU the
loader dequantizes it once, as it loads, to the model's dtype (the torch reference per call would cost seconds per
token), except an embedding table that is not also the LM head: a lookup decodes only its rows.
"""

from dataclasses import dataclass

import torch
from torch import nn

from infer.kernels import activation, gemv, quant

from .parallel import Parallel

@dataclass(frozen=True)
class Shard:
    """The slice of a weight this rank holds under tensor parallelism (engine/parallel.py): [start, stop) of its rows
    (dim 0: an output split) or of its columns (dim 1: an input split)."""

    dim: int
    start: int
    stop: int

    def of(self, t: torch.Tensor) -> torch.Tensor:
        """This slice of a full tensor [out, in] (or [out] for dim 0)."""
        return t[self.start:self.stop] if self.dim == 0 else t[:, self.start:self.stop]

    def whole_blocks(self, qtype: quant.QuantType) -> bool:
        return self.dim == 0 or (self.start % qtype.block_elems == 0 and self.stop % qtype.block_elems == 0)

    def of_blocks(self, data: torch.Tensor, qtype: quant.QuantType) -> torch.Tensor:
        """This slice of a packed weight's bytes [out, row_bytes] (whole_blocks must hold)."""
        if self.dim == 0:
            return data[self.start:self.stop]
        per_block = qtype.block_bytes
        return data[:, self.start // qtype.block_elems * per_block:self.stop // qtype.block_elems * per_block]


def load_weight(data: torch.Tensor, qtype: quant.QuantType, shape: tuple[int, ...], device: torch.device,
                dtype: torch.dtype, packed: bool, shard: Shard | None = None) -> tuple[torch.Tensor, quant.QuantType | None]:
    """A weight of full `shape` from its GGML bytes data uint8 [rows, row_bytes]: (the tensor to hold, its QuantType
    or None for a dense one), only `shard` of it when given. Quantized types stay in their blocks (in the kernels'
    layout, quant.to_kernel_layout) when `packed`
    (and the shard cuts whole blocks); float types, and the rest, become dense tensors of `dtype`."""
    if packed and qtype.block_elems > 1 and (shard is None or shard.whole_blocks(qtype)):
        data = (data if shard is None else shard.of_blocks(data, qtype)).contiguous().to(device)
        return quant.to_kernel_layout(data, qtype), qtype
    weight = quant.reference(data, qtype).reshape(shape)
    return (weight if shard is None else shard.of(weight)).contiguous().to(device=device, dtype=dtype), None


class Linear(nn.Module):
    """y = x W^T (+ b), the parameters named as in the checkpoint (weight [out, in] or its blocks, bias [out]).

    Called as layer(x, gated, residual, residual_scale, argmax, out_dtype): x [T, in], or x = [gate | up]
    [T, 2 * in] when gated, the input then being silu(gate) * up; with a residual [T, out] the result is the new
    residual stream residual + residual_scale * y. One row on CUDA (a decode step) runs the GEMV kernel with the
    activation and the add fused (faster than cuBLAS there); it can also pack the row's argmax into `argmax` (see
    gemv.argmax_buffer) and write out_dtype (the values are rounded to x's dtype either way). A packed weight
    multiplies up to gemv.SKINNY_MAX_ROWS rows in place (speculative verification) and is dequantized for longer
    chunks; dense weights run cuBLAS (or the CPU) past one row. Past one row the result has x's dtype."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, parallel: Parallel | None = None,
                 split: int | None = None):
        """parallel, split: under tensor parallelism this rank holds a slice of the rows (split 0: outputs) or of
        the columns (split 1: inputs, the ranks' partial sums then added up by an all-reduce)."""
        super().__init__()
        self.parallel = parallel
        self.shard = None
        self.full_shape = (out_features, in_features)
        if parallel is not None and split is not None:
            start, stop = parallel.split((out_features, in_features)[split], ("output", "input")[split] + " features")
            self.shard = Shard(split, start, stop)
            out_features, in_features = (stop - start, in_features) if split == 0 else (out_features, stop - start)
        self.weight = nn.Parameter(torch.empty(out_features, in_features))  # [out, in], or [out, row_bytes] packed
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None  # [out]
        self.qtype: quant.QuantType | None = None  # the GGML type of a packed weight; None: dense

    def load(self, data: torch.Tensor, qtype: quant.QuantType, device: torch.device, dtype: torch.dtype,
             packed: bool) -> None:
        """Hold the weight given as GGML bytes of the full weight (see load_weight)."""
        weight, self.qtype = load_weight(data, qtype, self.full_shape, device, dtype, packed, self.shard)
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

    def rounds(self, x: torch.Tensor) -> bool:
        """Whether this layer multiplies x [T, in] by integer dot products (quant.round_x's values of x: a decode
        step on CUDA over a packed weight that gemv.integer_dot takes)."""
        return (x.is_cuda and x.shape[0] == 1 and self.qtype is not None and (self.shard is None or self.shard.dim == 0)
                and gemv.integer_dot(self.qtype, self.weight.shape[1]))

    def forward(self, x: torch.Tensor, gated: bool = False, residual: torch.Tensor | None = None,
                residual_scale: float = 1.0, argmax: torch.Tensor | None = None,
                out_dtype: torch.dtype | None = None, rounded: tuple | None = None) -> torch.Tensor:
        """rounded: quant.round_x of x computed already (see `rounds`; the RMSNorm before writes it)."""
        if self.shard is not None and self.shard.dim == 1:  # partial sums over this rank's inputs: added up
            y = self.parallel.all_reduce(self._apply(x, gated, None, 1.0, None, None, None))
            return y if residual is None else torch.add(residual, y, alpha=residual_scale)
        return self._apply(x, gated, residual, residual_scale, argmax, out_dtype, rounded)

    def _apply(self, x, gated, residual, residual_scale, argmax, out_dtype, rounded) -> torch.Tensor:
        rows = x.shape[0]
        if x.is_cuda and rows == 1:
            return gemv.gemv(x, self.weight, self.bias, gated, residual, residual_scale, argmax, out_dtype,
                             qtype=self.qtype, rounded=rounded if self.rounds(x) else None)
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
    their outputs concatenated [T, sum of the outs]. The parts that take integer dot products share one round_x of
    x."""

    def __init__(self, *parts: Linear):
        super().__init__()
        self.parts = nn.ModuleList(parts)

    def rounds(self, x: torch.Tensor) -> bool:
        return any(part.rounds(x) for part in self.parts)

    def forward(self, x: torch.Tensor, rounded: tuple | None = None) -> torch.Tensor:
        if rounded is None and self.rounds(x):
            rounded = quant.round_x(x)
        return torch.cat([part(x, rounded=rounded) for part in self.parts], dim=-1)


class Embedding(nn.Module):
    """The token embedding: weight [vocab, hidden] (or its blocks); tokens [T] -> [T, hidden]. A packed table is
    dequantized row by row as tokens look it up. Under tensor parallelism this rank holds a slice of the vocabulary
    (its rows); the ranks' lookups, each zero for the tokens it does not hold, are added up."""

    def __init__(self, num_embeddings: int, embedding_dim: int, parallel: Parallel | None = None):
        super().__init__()
        self.parallel = parallel
        self.shard = None
        self.full_shape = (num_embeddings, embedding_dim)
        if parallel is not None:
            self.shard = Shard(0, *parallel.split(num_embeddings, "vocabulary"))
            num_embeddings = self.shard.stop - self.shard.start
        self.weight = nn.Parameter(torch.empty(num_embeddings, embedding_dim))  # [vocab, hidden], or its blocks
        self.qtype: quant.QuantType | None = None
        self.dtype: torch.dtype | None = None  # the model's dtype (Transformer.setup): a packed table's rows

    def load(self, data: torch.Tensor, qtype: quant.QuantType, device: torch.device, dtype: torch.dtype,
             packed: bool) -> None:
        weight, self.qtype = load_weight(data, qtype, self.full_shape, device, dtype, packed, self.shard)
        self.weight = nn.Parameter(weight, requires_grad=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.shard is None:
            return self._lookup(tokens)
        local = tokens - self.shard.start  # [T]
        held = (local >= 0) & (local < self.weight.shape[0])
        rows = self._lookup(torch.where(held, local, 0)) * held[:, None]  # [T, hidden]
        return self.parallel.all_reduce(rows)

    def _lookup(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.qtype is None:
            return nn.functional.embedding(tokens, self.weight)
        if not self.weight.is_cuda:  # the torch reference, on the rows looked up
            rows = quant.from_kernel_layout(self.weight[tokens], self.qtype)  # [T, row_bytes]
            return quant.reference(rows, self.qtype, self.dtype)
        return quant.dequantize(self.weight, self.qtype, self.dtype, rows=tokens)
