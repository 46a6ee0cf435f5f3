"""The whole model's decode passes on a CUDA GPU: replayed from CUDA graphs they equal eager passes, and cached
decoding equals one forward over everything (dense and block-sparse). Skipped without CUDA; run on its own like
tests/test_gpu.py (the CPU kernel tests set TRITON_INTERPRET=1)."""

import os

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

SPARSE = {  # small block counts so that the selection matters at a few hundred tokens
    "dense": None,
    "sparse": dict(mode="on", topk=4, window_size=128),
    "auto": dict(mode="auto", dense_len=300, topk=4, window_size=128),  # crosses from dense to sparse mid-decode
}
WIDTHS = [1, 1, 3, 1, 5, 1, 1, 8, 2] * 5  # decode steps and verification passes of k drafts + 1


@pytest.fixture(autouse=True)
def compiled_kernels():
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET=1 (set by the CPU kernel tests): run this file on its own")


@pytest.fixture(scope="module", params=[None, "q4_k_m"], ids=["bf16", "q4_k_m"])
def model(request):
    """A random SmolLM2-shaped model, its matrices bf16 or in a Q4_K_M file's GGML types (packed)."""
    from infer.engine.measure import bench

    return bench.random_model("smollm2-135m", torch.device("cuda"), torch.bfloat16, request.param)


def passes(model, sparse, graphs: bool, prompt: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Logits [len(tokens), V] of `tokens` fed after `prompt` in passes of WIDTHS tokens."""
    from infer.engine.config import sparse_config
    from infer.engine.cuda_graph import GraphedDecode

    cache = model.new_cache(1024, sparse_config(None, **sparse) if sparse else None)
    model(prompt, cache)
    step = GraphedDecode(model, cache, enabled=graphs)
    out, begin = [], 0
    for width in WIDTHS:
        out.append(step(tokens[begin:begin + width]).clone())
        begin += width
    assert cache.length == len(prompt) + begin
    return torch.cat(out)


@pytest.mark.parametrize("name", SPARSE)
def test_graph_replays_equal_eager_passes(model, name):
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, model.cfg.vocab_size, (250,), generator=gen).cuda()
    tokens = torch.randint(0, model.cfg.vocab_size, (sum(WIDTHS),), generator=gen).cuda()
    eager = passes(model, SPARSE[name], False, prompt, tokens)
    graphed = passes(model, SPARSE[name], True, prompt, tokens)
    assert torch.equal(graphed.argmax(-1), eager.argmax(-1))
    assert (graphed - eager).abs().max().item() < 1e-3


@pytest.mark.parametrize("name", ["dense", "sparse"])
def test_graphed_decoding_equals_one_forward(model, name):
    """Decode passes (split-K kernels, lengths on the device) against one prefill pass (SDPA / block-sparse prefill).
    With sparse on, the prefill selects per 64-query tile and decode per query, so only the window-only part
    (first 128 + 64 positions) must agree there; dense must agree everywhere."""
    from infer.engine.config import sparse_config

    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, model.cfg.vocab_size, (sum(WIDTHS) + 20,), generator=gen).cuda()
    stepped = passes(model, SPARSE[name], True, tokens[:20], tokens[20:])
    cache = model.new_cache(1024, sparse_config(None, **SPARSE[name]) if SPARSE[name] else None)
    full = model(tokens, cache, num_logits=len(tokens))[20:]
    n = len(stepped) if name == "dense" else 128 + 64 - 20
    err = ((stepped[:n] - full[:n]).norm() / full[:n].norm()).item()
    assert err < 2e-2, err


@pytest.mark.parametrize("name", SPARSE)
def test_greedy_next_feeds_the_argmax(model, name):
    """Replaying pass after pass on greedy_next (the graph writes its argmax there) decodes what eager greedy
    decoding does: across a capture mid-decode ("auto" turns sparse at 300) and after a rollback."""
    from infer.engine.config import sparse_config
    from infer.engine.cuda_graph import GraphedDecode

    gen = torch.Generator().manual_seed(3)
    prompt = torch.randint(0, model.cfg.vocab_size, (250,), generator=gen).cuda()
    first = torch.randint(0, model.cfg.vocab_size, (1,), generator=gen).cuda()

    def decode(graphs: bool) -> list[int]:
        cache = model.new_cache(1024, sparse_config(None, **SPARSE[name]) if SPARSE[name] else None)
        model(prompt, cache)
        step = GraphedDecode(model, cache, enabled=graphs)
        out, token = [], first
        for i in range(90):
            if i == 60:  # roll back 5 passes and feed a token from the host
                cache.truncate(cache.length - 5)
                del out[-5:]
                token = first
            logits = step(token)
            token = step.greedy_next if graphs else logits.argmax(-1)
            assert int(token) == int(logits[0].argmax())
            out.append(int(token))
        return out

    assert decode(True) == decode(False)


def test_chunked_dense_prefill_equals_one_pass(model):
    """Prefill chunks after cached tokens attend through the block kernel with every block selected."""
    gen = torch.Generator().manual_seed(2)
    tokens = torch.randint(0, model.cfg.vocab_size, (700,), generator=gen).cuda()
    one = model(tokens, model.new_cache(1024), num_logits=700)
    cache = model.new_cache(1024)
    chunked = torch.cat([model(tokens[:300], cache, num_logits=300), model(tokens[300:], cache, num_logits=400)])
    err = ((chunked - one).norm() / one.norm()).item()
    assert err < 2e-2, err


def test_prefill_runs_a_sparse_prompt_s_last_position_through_the_graph(model):
    """The engine's prefill hands a sparse prompt's last position to its graphed decode: the logits equal eager."""
    from infer.engine.config import sparse_config
    from infer.engine.cuda_graph import GraphedDecode
    from infer.engine.model import prefill

    gen = torch.Generator().manual_seed(4)
    tokens = torch.randint(0, model.cfg.vocab_size, (400,), generator=gen).tolist()
    logits = {}
    for graphs in (False, True):
        cache = model.new_cache(1024, sparse_config(None, **SPARSE["sparse"]))
        step = GraphedDecode(model, cache, enabled=graphs)
        logits[graphs] = prefill(model, cache, [], tokens, 0, 128, decode=step).clone()
        assert cache.length == 400 and len(step.graphs) == int(graphs)
    assert torch.equal(logits[True].argmax(-1), logits[False].argmax(-1))
    assert (logits[True] - logits[False]).abs().max().item() < 1e-3
