"""`infer bench --attention --check` runs each kernel of one attention layer against its reference at the real
shape on the GPU; here the same checks run at a small shape under the Triton interpreter, so CI runs them too."""

import torch

from infer.engine.config import SparseConfig
from infer.engine.measure.checks import attention_checks


def test_attention_checks_pass_at_a_small_shape():
    s = SparseConfig(kernel_size=16, kernel_stride=8, block_size=16, window_size=32, topk=16)
    results = attention_checks(L=768, heads=4, kv_heads=2, head_dim=16, dtype=torch.float32, device="cpu", s=s,
                               chunk=256)
    assert len(results) == 10 and all(r.passed for r in results), [r for r in results if not r.passed]
