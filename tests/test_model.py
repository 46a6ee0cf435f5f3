"""The engine's Transformer against Hugging Face transformers on random tiny configs of every architecture."""

import json
import math

import pytest
import torch
import transformers
from safetensors.torch import save_file

from infer.engine.weights import Checkpoint, load_model

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=64, rms_norm_eps=1e-6, initializer_range=0.25)

CASES = {
    "llama-mha-tied": dict(model_type="llama", num_key_value_heads=4, tie_word_embeddings=True),
    "llama-gqa2-linear": dict(model_type="llama", num_key_value_heads=2, rope_scaling={"rope_type": "linear", "factor": 2.0}),
    "llama-gqa4-llama3": dict(model_type="llama", num_key_value_heads=1, rope_theta=500000.0, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16}),
    "llama-dynamic": dict(model_type="llama", num_key_value_heads=2, max_position_embeddings=16,
                          rope_scaling={"rope_type": "dynamic", "factor": 2.0}),
    "llama-yarn": dict(model_type="llama", num_key_value_heads=2, rope_scaling={
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}),
    "llama-mlp-untied-rope-parameters": dict(model_type="llama", num_key_value_heads=2,
                                             rope_parameters={"rope_type": "default", "rope_theta": 1000.0}),
    "mistral-gqa4": dict(model_type="mistral", num_key_value_heads=1, sliding_window=None, rope_theta=1e6),
    "qwen2-bias": dict(model_type="qwen2", num_key_value_heads=2, tie_word_embeddings=True),
    "qwen3-qknorm": dict(model_type="qwen3", num_key_value_heads=2, head_dim=32, attention_bias=False),
    "qwen3-gqa8": dict(model_type="qwen3", num_attention_heads=8, num_key_value_heads=1, head_dim=16),
}


def _save_hf(model, config: dict, path):
    """Write a checkpoint folder with exactly `config` as config.json (classic or rope_parameters keys)."""
    path.mkdir()
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if config.get("tie_word_embeddings"):
        state.pop("lm_head.weight", None)
    save_file(state, path / "model.safetensors")
    (path / "config.json").write_text(json.dumps(config))


def _hf_model(config: dict):
    hf_config = transformers.AutoConfig.for_model(**config)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32).eval()
    with torch.no_grad():  # norms start at one: make them random so they are checked too
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return model


def _engine_logits(path, tokens: torch.Tensor, chunks: list[int]) -> torch.Tensor:
    checkpoint = Checkpoint(path)
    model = load_model(checkpoint, checkpoint.config(), torch.device("cpu"), torch.float32, progress=False)
    cache = model.new_cache(tokens.shape[0])
    out, begin = [], 0
    for size in chunks:
        out.append(model(tokens[begin:begin + size], cache, num_logits=size))
        begin += size
    return torch.cat(out)


def _tokens(n: int) -> torch.Tensor:
    return torch.randint(0, TINY["vocab_size"], (n,), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name", CASES)
def test_logits_match_transformers(name, tmp_path):
    config = {**TINY, **CASES[name]}
    model = _hf_model(config)
    _save_hf(model, config, tmp_path / "m")
    tokens = _tokens(24)  # longer than the dynamic case's max_position_embeddings
    with torch.no_grad():
        expected = model(tokens[None]).logits[0]
    got = _engine_logits(tmp_path / "m", tokens, [24])
    assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4), (got - expected).abs().max()


@pytest.mark.parametrize("name", ["llama-gqa2-linear", "qwen2-bias", "qwen3-qknorm"])
def test_cached_decode_equals_full_forward(name, tmp_path):
    """Prefill in two chunks, then one token at a time: the logits equal one forward over everything."""
    config = {**TINY, **CASES[name]}
    _save_hf(_hf_model(config), config, tmp_path / "m")
    tokens = _tokens(20)
    full = _engine_logits(tmp_path / "m", tokens, [20])
    stepped = _engine_logits(tmp_path / "m", tokens, [7, 5] + [1] * 8)
    assert torch.allclose(stepped, full, atol=1e-5, rtol=1e-5), (stepped - full).abs().max()


@pytest.mark.parametrize("rope", [None, "longrope"])
def test_minicpm_matches_llama_with_folded_scalings(rope, tmp_path):
    """MiniCPM is Llama plus three scalings; fold them into a Llama's weights and compare with transformers' Llama.

    scale_emb multiplies the embeddings; scale_depth/sqrt(layers) scales o_proj and down_proj (the residual branches);
    the logits see hidden / (hidden_size / dim_model_base), so the (tied) LM head is scaled by dim_model_base/hidden_size.
    """
    scale_emb, scale_depth, dim_model_base = 12.0, 1.4, 16
    llama = {**TINY, "model_type": "llama", "num_key_value_heads": 2, "tie_word_embeddings": True}
    if rope == "longrope":  # MiniCPM4's form: factors per frequency; long ones past original_max_position_embeddings
        half = TINY["hidden_size"] // TINY["num_attention_heads"] // 2
        llama["rope_scaling"] = {"rope_type": "longrope", "original_max_position_embeddings": 16,
                                 "short_factor": [1.0 + 0.1 * i for i in range(half)],
                                 "long_factor": [1.0 + 0.5 * i for i in range(half)]}
    model = _hf_model(llama)
    minicpm = {**llama, "model_type": "minicpm", "scale_emb": scale_emb, "scale_depth": scale_depth,
               "dim_model_base": dim_model_base}
    _save_hf(model, minicpm, tmp_path / "m")

    residual = scale_depth / math.sqrt(TINY["num_hidden_layers"])
    folded = transformers.AutoModelForCausalLM.from_config(
        transformers.AutoConfig.for_model(**{**llama, "tie_word_embeddings": False}), dtype=torch.float32).eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    embed = state["model.embed_tokens.weight"]
    state["lm_head.weight"] = embed * dim_model_base / TINY["hidden_size"]
    state["model.embed_tokens.weight"] = embed * scale_emb
    for k in state:
        if k.endswith(("o_proj.weight", "down_proj.weight")):
            state[k] = state[k] * residual
    folded.load_state_dict(state)
    tokens = _tokens(24)  # past original_max_position_embeddings: the long factors apply
    with torch.no_grad():
        expected = folded(tokens[None]).logits[0]
    got = _engine_logits(tmp_path / "m", tokens, [24])
    assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4), (got - expected).abs().max()
