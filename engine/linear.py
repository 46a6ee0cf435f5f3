"""The model's projections: a Linear layer owns its weight's format and decides, once, how each shape runs."""

import torch
from torch import nn

from infer.kernels import activation, gemv


class Linear(nn.Module):
    """y = x W^T (+ b), the parameters named as in the checkpoint (weight [out, in], bias [out]).

    Called as layer(x, gated, residual, residual_scale, argmax, out_dtype): x [T, in], or x = [gate | up]
    [T, 2 * in] when gated, the input then being silu(gate) * up; with a residual [T, out] the result is the new
    residual stream residual + residual_scale * y. One row on CUDA (a decode step) runs the GEMV kernel with the
    activation and the add fused (faster than cuBLAS there); it can also pack the row's argmax into `argmax` (see
    gemv.argmax_buffer) and write out_dtype (the values are rounded to x's dtype either way). Other shapes run
    cuBLAS (or the CPU) and return x's dtype."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))  # [out, in]
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None  # [out]

    @staticmethod
    def fused(*parts: "Linear") -> "Linear":
        """One layer whose output is the outputs of `parts` side by side (one weight read, one launch)."""
        weight = torch.cat([p.weight for p in parts])  # [sum of the outs, in]
        with torch.device("meta"):
            layer = Linear(weight.shape[1], weight.shape[0], bias=parts[0].bias is not None)
        layer.weight = nn.Parameter(weight, requires_grad=False)
        if layer.bias is not None:
            layer.bias = nn.Parameter(torch.cat([p.bias for p in parts]), requires_grad=False)
        return layer

    def rows(self, ids: torch.Tensor) -> "Linear":
        """A layer with only the output rows `ids` [N] of this one (FR-Spec's pruned LM head)."""
        with torch.device("meta"):
            layer = Linear(self.weight.shape[1], ids.numel(), bias=self.bias is not None)
        layer.weight = nn.Parameter(self.weight[ids], requires_grad=False)  # [N, in]
        if layer.bias is not None:
            layer.bias = nn.Parameter(self.bias[ids], requires_grad=False)
        return layer

    def forward(self, x: torch.Tensor, gated: bool = False, residual: torch.Tensor | None = None,
                residual_scale: float = 1.0, argmax: torch.Tensor | None = None,
                out_dtype: torch.dtype | None = None) -> torch.Tensor:
        if x.is_cuda and x.shape[0] == 1:
            return gemv.gemv(x, self.weight, self.bias, gated, residual, residual_scale, argmax, out_dtype)
        assert argmax is None, "the argmax is packed by the one-row CUDA kernel only"
        if gated:
            x = (activation.silu_mul if x.is_cuda else activation.reference)(x)
        y = nn.functional.linear(x, self.weight, self.bias)
        return y if residual is None else torch.add(residual, y, alpha=residual_scale)
