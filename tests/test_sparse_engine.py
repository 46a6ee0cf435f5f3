"""Sparse attention inside the model: the dense/sparse switch, block selection, summaries under rollback."""

import pytest
import torch

from infer.engine.attention import SelectionRecord
from infer.engine.config import ModelConfig, SparseConfig
from infer.engine.model import Transformer, prefill
from infer.kernels import pool_keys

TINY = dict(model_type="qwen2", vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)


def tiny_model(seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(ModelConfig.from_dict(TINY))
    for p in model.parameters():
        p.requires_grad_(False).normal_(0, 0.3)
    model.setup(torch.device("cpu"), torch.float32)
    return model


def small_sparse(**overrides) -> SparseConfig:
    return SparseConfig(**{**dict(kernel_size=8, kernel_stride=4, block_size=16, window_size=16, topk=4,
                                  init_blocks=1, dense_len=64, mode="on"), **overrides})


def run(model, tokens, sparse, chunks, record=None):
    cache = model.new_cache(tokens.shape[0] + 4, sparse)
    out, begin = [], 0
    for size in chunks:
        out.append(model(tokens[begin:begin + size], cache, num_logits=size, record=record))
        begin += size
    return torch.cat(out), cache


def test_sparse_with_every_block_selected_equals_dense():
    model, tokens = tiny_model(), torch.randint(0, 97, (150,))
    dense, _ = run(model, tokens, None, [150])
    everything = small_sparse(topk=1000)
    for chunks in ([150], [70, 40, 30] + [1] * 10, [100, 5, 3, 42]):
        sparse, _ = run(model, tokens, everything, chunks)
        assert torch.allclose(sparse, dense, atol=1e-4, rtol=1e-4), (chunks, (sparse - dense).abs().max())


def test_sparse_selection_changes_long_range_attention_only():
    model, tokens = tiny_model(), torch.randint(0, 97, (200,))
    dense, _ = run(model, tokens, None, [200])
    record = SelectionRecord()
    sparse, cache = run(model, tokens, small_sparse(), [150] + [1] * 50, record)
    window_only = 16 + 16  # queries whose causal keys all lie in forced blocks see exactly the dense keys
    assert torch.allclose(sparse[:window_only], dense[:window_only], atol=1e-4, rtol=1e-4)
    assert not torch.allclose(sparse[150:], dense[150:], atol=1e-3)
    block_count, keys = record.block_count, record.end
    assert keys == 200 and int(block_count.max()) <= 4 + 2  # topk, plus forced blocks past it


@pytest.mark.parametrize("mode", ["on", "auto"])
def test_verifying_several_tokens_equals_decoding_them_one_by_one(mode):
    """Speculative verification feeds up to 8 tokens at once: each must get the blocks (and, across dense_len in auto
    mode, the path) it gets decoded alone."""
    model, tokens = tiny_model(), torch.randint(0, 97, (200,))
    sparse = small_sparse(mode=mode, dense_len=180)
    one_by_one, _ = run(model, tokens, sparse, [176] + [1] * 24)
    batched, _ = run(model, tokens, sparse, [176, 8, 5, 3, 8])
    assert torch.allclose(batched[176:], one_by_one[176:], atol=1e-5, rtol=1e-5)


def test_auto_mode_is_dense_up_to_dense_len():
    model, tokens = tiny_model(), torch.randint(0, 97, (100,))
    dense, _ = run(model, tokens, None, [64] + [1] * 36)
    auto, _ = run(model, tokens, small_sparse(mode="auto", dense_len=80), [64] + [1] * 36)
    assert torch.allclose(auto[:80], dense[:80], atol=1e-5)  # positions < dense_len: dense
    assert not torch.allclose(auto[80:], dense[80:], atol=1e-3)  # past it: sparse


@pytest.mark.parametrize("keep", [0, 37, 64, 99])
def test_summaries_after_rollback_equal_a_cache_that_never_saw_the_rejected_tokens(keep):
    model = tiny_model()
    tokens, other = torch.randint(0, 97, (120,)), torch.randint(0, 97, (120,))
    sparse = small_sparse()
    _, clean = run(model, tokens[:keep + 20], sparse, [keep, 20] if keep else [20])
    cache = model.new_cache(keep + 60, sparse)
    if keep:
        model(tokens[:keep], cache)
    model(other[:50], cache)  # rejected continuation
    cache.truncate(keep)
    model(tokens[keep:keep + 20], cache)
    n = pool_keys.num_summaries(keep + 20, sparse.kernel_size, sparse.kernel_stride)
    assert torch.equal(cache.summaries[:, :, :n], clean.summaries[:, :, :n])
    assert torch.equal(cache.k[:, :, :keep + 20], clean.k[:, :, :keep + 20])


def test_use_nope_summaries_pool_the_keys_before_rope():
    model, tokens = tiny_model(), torch.randint(0, 97, (100,))
    sparse = small_sparse(use_nope=True)
    captured = []
    hook = model.layers[1].self_attn.register_forward_pre_hook(lambda module, args: captured.append(args[0]))
    try:
        _, cache = run(model, tokens, sparse, [37, 1, 1, 61])  # windows completed across calls and within one
    finally:
        hook.remove()
    attn = model.layers[1].self_attn
    q_width, k_width = attn.num_heads * attn.head_dim, attn.num_kv_heads * attn.head_dim
    h = model.layers[1].input_layernorm(torch.cat(captured))  # the layer's normed input [T, hidden]
    k = attn.qkv_proj(h)[:, q_width:q_width + k_width]  # [T, Hkv * d] before RoPE
    k = k.reshape(100, attn.num_kv_heads, attn.head_dim).transpose(0, 1)  # [Hkv, T, d]
    n = pool_keys.num_summaries(100, sparse.kernel_size, sparse.kernel_stride)
    expected = pool_keys.reference(k, 0, n, sparse.kernel_size, sparse.kernel_stride)
    assert torch.allclose(cache.summaries[1, :, :n], expected, atol=1e-5)
    _, rope_cache = run(model, tokens, small_sparse(), [100])
    assert not torch.allclose(rope_cache.summaries[1, :, :n], expected, atol=1e-2)


def test_use_nope_changes_the_selection_and_equals_dense_with_every_block_selected():
    model, tokens = tiny_model(), torch.randint(0, 97, (200,))
    dense, _ = run(model, tokens, None, [200])
    for chunks in ([200], [120, 30] + [1] * 50):
        everything, _ = run(model, tokens, small_sparse(topk=1000, use_nope=True), chunks)
        assert torch.allclose(everything, dense, atol=1e-4, rtol=1e-4), (chunks, (everything - dense).abs().max())
    # the attention given a selection does not depend on how it was scored: different logits = different blocks
    rope, _ = run(model, tokens, small_sparse(), [150] + [1] * 50)
    nope, _ = run(model, tokens, small_sparse(use_nope=True), [150] + [1] * 50)
    assert torch.allclose(rope[:32], nope[:32], atol=1e-5)  # local window only: nothing to choose yet
    assert not torch.allclose(rope[150:], nope[150:], atol=1e-3)


def test_bench_cache_at_depth_holds_the_summaries_of_its_keys():
    """`infer bench` decodes after random cached keys: their summaries are pooled (on CPU by the reference)."""
    from infer.engine.measure.bench import decode_at_depth

    sparse = small_sparse()
    cache, step = decode_at_depth(tiny_model(), 100, 8, sparse, graphs=False)
    C = pool_keys.num_summaries(100, sparse.kernel_size, sparse.kernel_stride)
    for layer in range(TINY["num_hidden_layers"]):
        want = pool_keys.reference(cache.k[layer], 0, C, sparse.kernel_size, sparse.kernel_stride)
        assert torch.equal(cache.summaries[layer, :, :C], want)
    cache.length = 100
    assert step(torch.tensor([3])).shape == (1, TINY["vocab_size"])


def test_prefill_runs_a_sparse_prompt_s_last_position_alone():
    """The token sampled after a prompt selects its blocks as a decoded token does, not with a tile of the prompt."""
    model, tokens = tiny_model(), torch.randint(0, 97, (150,))
    sparse = small_sparse(topk=6)
    cache, cached, alone = model.new_cache(160, sparse), [], []
    decode = lambda t: alone.append(t.tolist()) or model(t, cache)  # noqa: E731
    logits = prefill(model, cache, cached, tokens.tolist(), 0, 64, decode=decode)
    assert alone == [tokens[-1:].tolist()] and cached == tokens.tolist() and cache.length == 150
    by_hand, _ = run(model, tokens, sparse, [64, 64, 21, 1])
    assert torch.allclose(logits, by_hand[-1:], atol=1e-5)
    shared, _ = run(model, tokens, sparse, [64, 64, 22])  # the last position in a query tile of the prompt
    assert not torch.allclose(shared[-1:], by_hand[-1:], atol=1e-3)
    other = torch.randint(0, 97, (10,)).tolist()
    prefill(model, cache, cached, tokens[:120].tolist() + other, 120, 64, decode=decode)  # a reused prefix
    assert alone[1:] == [other[-1:]] and cache.length == 130


def test_prefill_runs_a_dense_prompt_in_its_chunks_only():
    model, tokens = tiny_model(), torch.randint(0, 97, (100,))
    cache = model.new_cache(110, small_sparse(mode="auto", dense_len=100))
    logits = prefill(model, cache, [], tokens.tolist(), 0, 64, decode=lambda t: pytest.fail("a pass of its own"))
    want, _ = run(model, tokens, None, [64, 36])
    assert torch.allclose(logits, want[-1:], atol=1e-5)
