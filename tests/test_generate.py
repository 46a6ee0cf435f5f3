"""The engine end to end on the real demo model: greedy equality with transformers, prefix reuse, sampling, stops."""

import pytest
import torch
import transformers

from infer.engine.generate import Engine
from infer.engine.sampling import SamplingParams, probabilities

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain in two sentences why the sky is blue.",
]


@pytest.fixture(scope="module")
def engine(smollm2):
    return Engine(smollm2, device="cpu", progress=False)


@pytest.fixture(scope="module")
def hf_model(smollm2):
    return transformers.AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()




@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_64_tokens_equal_transformers(engine, hf_model, prompt):
    tokens = engine.tokenizer.encode_chat([{"role": "user", "content": prompt}])
    params = SamplingParams(max_tokens=64)
    text = "".join(engine.generate(tokens, params))
    with torch.no_grad():
        out = hf_model.generate(torch.tensor([tokens]), max_new_tokens=64, do_sample=False,
                                eos_token_id=sorted(engine.eos_ids), pad_token_id=min(engine.eos_ids))
    expected = out[0, len(tokens):].tolist()
    if expected and expected[-1] in engine.eos_ids:
        expected = expected[:-1]
    assert engine.tokenizer.decode(expected) == text
    assert engine.stats.generated_tokens >= len(expected) and len(expected) > 5


def test_second_turn_prefills_only_its_new_tokens(engine):
    first = [{"role": "user", "content": PROMPTS[0]}]
    tokens = engine.tokenizer.encode_chat(first)
    answer = "".join(engine.generate(tokens, SamplingParams(max_tokens=16)))
    second = first + [{"role": "assistant", "content": answer}, {"role": "user", "content": "And of Italy?"}]
    tokens2 = engine.tokenizer.encode_chat(second)
    reply = "".join(engine.generate(tokens2, SamplingParams(max_tokens=16)))
    common = 0  # the second prompt repeats the first turn; the cache holds it already
    while common < len(tokens) and tokens[common] == tokens2[common]:
        common += 1
    assert engine.stats.reused_tokens >= common > len(tokens) // 2
    assert engine.stats.prompt_tokens == len(tokens2) - engine.stats.reused_tokens
    engine.reset()
    fresh = "".join(engine.generate(tokens2, SamplingParams(max_tokens=16)))
    assert engine.stats.reused_tokens == 0 and fresh == reply


def test_seeded_sampling_is_reproducible_and_stop_strings_cut(engine):
    tokens = engine.tokenizer.encode_chat([{"role": "user", "content": PROMPTS[1]}])
    params = dict(temperature=0.9, top_p=0.95, top_k=50, seed=7, max_tokens=24)
    a = "".join(engine.generate(tokens, SamplingParams(**params)))
    b = "".join(engine.generate(tokens, SamplingParams(**params)))
    assert a == b and a
    stop = a[len(a) // 2: len(a) // 2 + 3]
    cut = "".join(engine.generate(tokens, SamplingParams(**params, stop=[stop])))
    assert cut == a[: a.index(stop)] and engine.stats.stop_reason == "stop string"


def test_the_pass_queued_ahead_is_rolled_back(engine):
    """Decoding runs one forward pass ahead of the text it streams. When the answer ends (max tokens, or the
    caller closing the stream), the cache holds exactly the prompt and the answer's tokens before the last one (the
    last is never fed: the answer did not go on past it)."""
    tokens = engine.tokenizer.encode_chat([{"role": "user", "content": PROMPTS[2]}])
    text = "".join(engine.generate(tokens, SamplingParams(max_tokens=8)))
    assert engine.stats.stop_reason == "max tokens" and engine.cache.length == len(engine.tokens) == len(tokens) + 7
    assert engine.tokens[:len(tokens)] == tokens and text.startswith(engine.tokenizer.decode(engine.tokens[len(tokens):]))
    stream = engine.generate(tokens, SamplingParams(max_tokens=64))
    next(stream), next(stream)
    stream.close()
    assert engine.stats.stop_reason == "interrupted" and engine.cache.length == len(engine.tokens)
    assert len(tokens) < len(engine.tokens) < len(tokens) + 8


def test_too_long_input_is_a_clear_error(engine):
    from infer.engine.errors import InferError

    with pytest.raises(InferError, match="context"):
        list(engine.generate([1] * engine.max_len, SamplingParams(max_tokens=1)))


def test_filters_match_their_definitions():
    logits = torch.tensor([3.0, 2.0, 1.0, 0.0, -1.0])
    probs = probabilities(logits, SamplingParams(temperature=1.0, top_k=3))
    assert probs[3:].sum() == 0 and torch.isclose(probs.sum(), torch.tensor(1.0))
    full = torch.softmax(logits, -1)
    probs = probabilities(logits, SamplingParams(temperature=1.0, top_p=float(full[0] + 0.01)))
    assert (probs > 0).tolist() == [True, True, False, False, False]
    probs = probabilities(logits, SamplingParams(temperature=1.0, min_p=0.3))
    assert (probs > 0).tolist() == [True, True, False, False, False]  # e^-1 = 0.37 >= 0.3 > e^-2
