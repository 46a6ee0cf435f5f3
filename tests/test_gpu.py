"""The Triton kernels compiled for a CUDA GPU, in bf16, against their torch references and dense SDPA.

Skipped without CUDA. Run them on their own: python -m pytest -q tests/test_gpu.py. The CPU kernel tests set
TRITON_INTERPRET=1, which would route these through the interpreter (wrong for bf16), so they skip when it is set.
Kernel modules are imported inside the tests, so collecting this file never decides how the kernels compile.
"""

import os

import pytest
import torch

DEVICE = "cuda"
DTYPE = torch.bfloat16
B = 64  # KV block size
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

from infer.engine.measure.compare import rel_err, sdpa_causal  # noqa: E402 (imports no kernel module)


@pytest.fixture(autouse=True)
def compiled_kernels():
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET=1 (set by the CPU kernel tests): run tests/test_gpu.py on its own")


def randn(*shape, gen):
    return torch.randn(*shape, generator=gen).to(DEVICE, DTYPE)


def kv_cache(Hkv, L, d, gen, extra=37):
    """k, v [Hkv, L + extra, d] whose dead tail (positions >= L) is NaN: it must never be read."""
    k, v = randn(Hkv, L + extra, d, gen=gen), randn(Hkv, L + extra, d, gen=gen)
    k[:, L:] = float("nan")
    v[:, L:] = float("nan")
    return k, v


def random_selection(Hkv, T, q_start, q_tile, max_sel, gen):
    """Per (kv head, tile): the diagonal block, block 0 and random other causal blocks, min(max_sel, available) or
    one fewer, ascending, -1 padded."""
    n_tiles = -(-T // q_tile)
    idx = torch.full((Hkv, n_tiles, max_sel), -1, dtype=torch.int32)
    cnt = torch.zeros(Hkv, n_tiles, dtype=torch.int32)
    for g in range(Hkv):
        for i in range(n_tiles):
            n_avail = (q_start + min((i + 1) * q_tile, T) - 1) // B + 1
            order = [n_avail - 1, 0] + torch.randperm(n_avail, generator=gen).tolist()
            n = max(1, min(max_sel, n_avail) - int(torch.randint(0, 2, (1,), generator=gen)))
            idx[g, i, :n] = torch.tensor(sorted(list(dict.fromkeys(order))[:n]), dtype=torch.int32)
            cnt[g, i] = n
    return idx.to(DEVICE), cnt.to(DEVICE)


def all_causal_blocks(Hkv, T, q_start, q_tile):
    n_tiles = -(-T // q_tile)
    n_max = (q_start + T - 1) // B + 1
    idx = torch.full((Hkv, n_tiles, n_max), -1, dtype=torch.int32)
    cnt = torch.zeros(Hkv, n_tiles, dtype=torch.int32)
    for i in range(n_tiles):
        n = (q_start + min((i + 1) * q_tile, T) - 1) // B + 1
        idx[:, i, :n] = torch.arange(n, dtype=torch.int32)
        cnt[:, i] = n
    return idx.to(DEVICE), cnt.to(DEVICE)


@pytest.mark.parametrize("Hkv, d, L, kernel, stride", [
    (8, 128, 4133, 32, 16),
    (2, 64, 777, 32, 16),
    (4, 128, 1000, 24, 12),  # kernel not a power of two
    (1, 64, 300, 16, 16),  # no overlap
])
def test_pool_keys(Hkv, d, L, kernel, stride):
    from infer.kernels.pool_keys import num_summaries, pool_keys, reference

    gen = torch.Generator().manual_seed(0)
    k, _ = kv_cache(Hkv, L, d, gen)
    C = num_summaries(L, kernel, stride)
    summaries = torch.full((Hkv, C + 3, d), float("nan"), dtype=DTYPE, device=DEVICE)
    pool_keys(k, summaries, 0, C // 2, kernel, stride)  # in two calls, as prefill chunks do
    pool_keys(k, summaries, C // 2, C, kernel, stride)
    got, ref = summaries[:, :C], reference(k, 0, C, kernel, stride)
    assert torch.isfinite(got).all()
    assert rel_err(got, ref) < 1e-3
    assert (got == ref).float().mean().item() > 0.99  # fp32 mean rounded once: nearly always the same bf16


# (Hkv, G, d, q_start, T, q_tile, selection settings)
SMALL = dict(topk=16, window=512)  # top-k has work to do at these lengths
SCORE_CASES = [
    (4, 1, 64, 0, 1000, 64, SMALL),  # prefill from 0, ragged, MHA
    (2, 2, 128, 1500, 333, 64, SMALL),  # chunked prefill
    (8, 4, 128, 7000, 1024, 64, {}),  # Llama-3-8B shape, default settings
    (2, 8, 64, 2049, 517, 32, SMALL),  # GQA 8, several tiles
    (1, 8, 128, 9000, 1, 16, SMALL),  # decode, summaries split over programs
    (8, 4, 128, 30000, 1, 16, {}),  # decode, Llama-3-8B shape
    (4, 4, 128, 5000, 4, 16, SMALL),  # speculative verification
    (2, 2, 64, 100, 20, 16, SMALL),  # few summaries
]


@pytest.mark.parametrize("Hkv, G, d, q_start, T, q_tile, sel", SCORE_CASES)
def test_block_scores_and_selection(Hkv, G, d, q_start, T, q_tile, sel):
    from infer.kernels.block_select import block_select, reference_scores, select_blocks
    from infer.kernels.pool_keys import num_summaries

    gen = torch.Generator().manual_seed(1)
    C = num_summaries(q_start + T)
    q = randn(Hkv * G, T, d, gen=gen)
    summaries = torch.full((Hkv, C + 5, d), float("nan"), dtype=DTYPE, device=DEVICE)  # past C: never read
    summaries[:, :C] = randn(Hkv, C, d, gen=gen)
    ref = reference_scores(q, summaries, q_start, q_tile=q_tile)
    got = torch.full_like(ref, float("nan"))
    gi, gc = block_select(q, summaries, q_start, q_tile=q_tile, **sel, scores=got, tickets=tickets())
    fin = ref.isfinite()
    assert not got.isnan().any() and torch.equal(got.isfinite(), fin)  # all written, the same blocks scored
    assert rel_err(got[fin], ref[fin]) < 1e-3
    ri, rc = select_blocks(ref, q_start, T, q_tile=q_tile, **sel)
    assert torch.equal(gc, rc)
    n_blocks = got.shape[2]
    gm, rm = (torch.zeros(*i.shape[:2], n_blocks + 1, dtype=torch.bool, device=DEVICE).scatter_(
        2, torch.where(i < 0, n_blocks, i).long(), True)[..., :n_blocks] for i in (gi, ri))
    assert ((gm & rm).sum() / rm.sum()).item() >= 0.97  # near-ties may swap a few blocks


# (Hkv, G, d, q_start, T, q_tile, max_sel)
ATTN_CASES = [
    (4, 1, 64, 0, 1000, 64, 8),  # prefill from 0, ragged, MHA
    (2, 2, 128, 777, 300, 64, 12),  # a later chunk
    (2, 4, 128, 4096, 1024, 64, 64),
    (1, 8, 64, 100, 129, 32, 5),  # GQA 8, small tiles
    (8, 4, 128, 0, 2048, 64, 64),  # Llama-3-8B shape
    (2, 8, 128, 3000, 200, 16, 20),
]


@pytest.mark.parametrize("Hkv, G, d, q_start, T, q_tile, max_sel", ATTN_CASES)
def test_sparse_attention(Hkv, G, d, q_start, T, q_tile, max_sel):
    from infer.kernels.sparse_attention import reference, sparse_attention

    gen = torch.Generator().manual_seed(2)
    q = randn(Hkv * G, T, d, gen=gen)
    k, v = kv_cache(Hkv, q_start + T, d, gen)
    idx, cnt = random_selection(Hkv, T, q_start, q_tile, max_sel, gen)
    out = torch.full_like(q, float("nan"))
    sparse_attention(q, k, v, q_start, idx, cnt, q_tile=q_tile, out=out)
    assert torch.isfinite(out).all()
    assert rel_err(out, reference(q, k, v, q_start, idx, cnt, q_tile=q_tile)) < 1e-2


@pytest.mark.parametrize("Hkv, G, d, q_start, T", [
    (8, 4, 128, 0, 4096),  # Llama-3-8B shape
    (4, 1, 64, 0, 1000),
    (2, 8, 128, 1000, 777),  # a later chunk: bottom-right causal
    (2, 2, 64, 64, 513),
])
def test_sparse_attention_all_blocks_is_sdpa(Hkv, G, d, q_start, T):
    from infer.kernels.sparse_attention import sparse_attention

    gen = torch.Generator().manual_seed(3)
    q = randn(Hkv * G, T, d, gen=gen)
    k, v = kv_cache(Hkv, q_start + T, d, gen)
    idx, cnt = all_causal_blocks(Hkv, T, q_start, 64)
    out = sparse_attention(q, k, v, q_start, idx, cnt)
    assert rel_err(out, sdpa_causal(q, k, v, q_start)) < 1e-2


# (Hkv, G, d, L, T)
DECODE_CASES = [
    (8, 4, 128, 8192, 1),  # Llama-3-8B shape
    (8, 4, 128, 65536, 1),
    (2, 8, 64, 1000, 4),  # speculative verification
    (4, 1, 128, 3333, 1),  # MHA, ragged
    (2, 2, 64, 70, 8),  # two blocks
    (1, 8, 128, 20000, 2),
]


@pytest.mark.parametrize("Hkv, G, d, L, T", DECODE_CASES)
def test_sparse_decode(Hkv, G, d, L, T):
    from infer.kernels.sparse_decode import reference, sparse_decode

    gen = torch.Generator().manual_seed(4)
    q = randn(Hkv * G, T, d, gen=gen)
    k, v = kv_cache(Hkv, L, d, gen, extra=29)
    idx, cnt = random_selection(Hkv, T, L - T, T, 64, gen)  # one tile
    out = torch.full_like(q, float("nan"))
    sparse_decode(q, k, v, L, idx, cnt, out=out)
    assert torch.isfinite(out).all()
    assert rel_err(out, reference(q, k, v, L, idx, cnt)) < 1e-2


@pytest.mark.parametrize("Hkv, G, d, L, T", [(8, 4, 128, 131072, 5), (2, 8, 64, 1000, 4), (1, 8, 128, 20000, 8)])
def test_sparse_decode_selection_per_query_equals_each_query_alone(Hkv, G, d, L, T):
    """Each query's own blocks (speculative verification): the bits of a call for that query alone."""
    from infer.kernels.sparse_decode import reference, sparse_decode

    gen = torch.Generator().manual_seed(6)
    q = randn(Hkv * G, T, d, gen=gen)
    k, v = kv_cache(Hkv, L, d, gen, extra=29)
    idx, cnt = random_selection(Hkv, T, L - T, 1, 64, gen)  # [Hkv, T, 64], [Hkv, T]: a tile per query
    out = sparse_decode(q, k, v, device_int(L), idx, cnt)
    each = [sparse_decode(q[:, t:t + 1], k, v, L - T + t + 1, idx[:, t:t + 1], cnt[:, t:t + 1]) for t in range(T)]
    assert torch.equal(out, torch.cat(each, 1))
    assert rel_err(out, reference(q, k, v, L, idx, cnt)) < 1e-2


@pytest.mark.parametrize("Hkv, G, d, L, T", DECODE_CASES)
def test_sparse_decode_all_blocks_is_sdpa(Hkv, G, d, L, T):
    from infer.kernels.sparse_decode import sparse_decode

    gen = torch.Generator().manual_seed(5)
    q = randn(Hkv * G, T, d, gen=gen)
    k, v = kv_cache(Hkv, L, d, gen, extra=29)
    idx, cnt = all_causal_blocks(Hkv, T, L - T, T)
    out = sparse_decode(q, k, v, L, idx, cnt)
    assert rel_err(out, sdpa_causal(q, k, v, L - T)) < 1e-2


def device_int(x):
    return torch.tensor([x], dtype=torch.int32, device=DEVICE)  # [1]


def tickets():
    """The counters a decode-sized selection over many blocks needs (the KV cache owns them in the engine)."""
    from infer.kernels.block_select import new_tickets

    return new_tickets(torch.device(DEVICE))


@pytest.mark.parametrize("Hkv, G, d, L, T", DECODE_CASES)
def test_sparse_decode_device_length(Hkv, G, d, L, T):
    """A device L gives the int L's bits, sparse and dense; dense (no selection) is causal SDPA."""
    from infer.kernels.sparse_decode import reference, sparse_decode

    gen = torch.Generator().manual_seed(6)
    q = randn(Hkv * G, T, d, gen=gen)
    k, v = kv_cache(Hkv, L, d, gen, extra=300)  # dense: more splits than live blocks
    idx, cnt = random_selection(Hkv, T, L - T, T, 64, gen)
    for sel in ((idx, cnt), (None, None)):
        assert torch.equal(sparse_decode(q, k, v, device_int(L), *sel), sparse_decode(q, k, v, L, *sel))
    dense = sparse_decode(q, k, v, device_int(L))
    assert rel_err(dense, sdpa_causal(q, k, v, L - T)) < 1e-2
    assert rel_err(dense, reference(q, k, v, L)) < 1e-2


@pytest.mark.parametrize("Hkv, G, d, q_start, T", [(8, 4, 128, 30000, 1), (1, 8, 128, 9000, 1), (4, 4, 128, 5000, 4),
                                                    (2, 2, 64, 10, 3)])
def test_block_select_device_start(Hkv, G, d, q_start, T):
    """A device q_start (everything sized to the summaries' capacity) gives the int q_start's bits."""
    from infer.kernels.block_select import block_select
    from infer.kernels.pool_keys import num_summaries

    gen = torch.Generator().manual_seed(7)
    C, C_cap = num_summaries(q_start + T), num_summaries(q_start + T + 3000)
    q = randn(Hkv * G, T, d, gen=gen)
    summaries = torch.full((Hkv, C_cap, d), float("nan"), dtype=DTYPE, device=DEVICE)
    summaries[:, :C] = randn(Hkv, C, d, gen=gen)
    n_blocks, n_cap = -(-(q_start + T) // B), -(-(C_cap * 16 + 31) // B)
    ref_scores = torch.full((Hkv, 1, n_blocks), float("nan"), device=DEVICE)
    got_scores = torch.full((Hkv, 1, n_cap), float("nan"), device=DEVICE)
    sel = dict(q_tile=16, tickets=tickets(), **SMALL)
    ri, rc = block_select(q, summaries, q_start, scores=ref_scores, **sel)
    gi, gc = block_select(q, summaries, device_int(q_start), scores=got_scores, **sel)
    assert torch.equal(gi, ri) and torch.equal(gc, rc)
    assert torch.equal(got_scores[..., :n_blocks], ref_scores)


@pytest.mark.parametrize("Hkv, G, d, q_start, T", [(8, 4, 128, 131066, 6), (2, 7, 64, 30000, 8), (1, 8, 128, 9, 3)])
def test_block_select_per_query_equals_each_query_alone(Hkv, G, d, q_start, T):
    """Verification's one selection call for all its queries: each row has the bits of a call for that query."""
    from infer.kernels.block_select import block_select
    from infer.kernels.pool_keys import num_summaries

    gen = torch.Generator().manual_seed(12)
    summaries = randn(Hkv, num_summaries(q_start + T + 200), d, gen=gen)
    q = randn(Hkv * G, T, d, gen=gen)
    starts = torch.arange(q_start, q_start + T, dtype=torch.int32, device=DEVICE)
    sel = dict(q_tile=16, max_len=q_start + T + 200, tickets=tickets())
    idx, cnt = block_select(q, summaries, starts, per_query=True, **sel)
    for i in range(T):
        alone_idx, alone_cnt = block_select(q[:, i:i + 1], summaries, starts[i:i + 1], **sel)
        assert torch.equal(idx[:, i:i + 1], alone_idx) and torch.equal(cnt[:, i:i + 1], alone_cnt)


def test_chunked_decode_selection_equals_one_program():
    """At 128K (4096 lanes of blocks) decode selects per chunk of 512 blocks, then the last chunk to finish picks
    among the chunks' top ones: the same bits as one program per kv head, call after call (the chunks meet through
    a counter in memory)."""
    from infer.kernels import block_select
    from infer.kernels.pool_keys import num_summaries

    gen = torch.Generator().manual_seed(11)
    Hkv, G, d, q_start = 8, 4, 128, 131071
    summaries = randn(Hkv, num_summaries(q_start + 301), d, gen=gen)
    start, counters = device_int(q_start), tickets()
    one_program = block_select.Tuning(select_lanes=4096)
    for _ in range(20):
        q = randn(Hkv * G, 1, d, gen=gen)
        ri, rc = block_select.block_select(q, summaries, start, q_tile=16, max_len=q_start + 301, tuning=one_program)
        gi, gc = block_select.block_select(q, summaries, start, q_tile=16, max_len=q_start + 301, tickets=counters)
        assert torch.equal(gi, ri) and torch.equal(gc, rc)


def test_decode_cuda_graph_replays_at_new_lengths():
    """Selection, sparse and dense decode with device lengths, captured once in a CUDA graph and replayed at other
    lengths: the eager int-length calls' bits."""
    from infer.kernels.block_select import block_select
    from infer.kernels.pool_keys import num_summaries, reference
    from infer.kernels.sparse_decode import sparse_decode

    Hkv, G, d, T, max_len = 8, 4, 128, 1, 16384
    gen = torch.Generator().manual_seed(8)
    q = randn(Hkv * G, T, d, gen=gen)
    k, v = randn(Hkv, max_len, d, gen=gen), randn(Hkv, max_len, d, gen=gen)
    summaries = reference(k, 0, num_summaries(max_len))  # [Hkv, C, d]
    sel = dict(q_tile=16, topk=16, window=512, tickets=tickets())
    L, start = device_int(1000), device_int(1000 - T)

    def decode():
        idx, cnt = block_select(q, summaries, start, max_len=max_len, **sel)
        return idx, cnt, sparse_decode(q, k, v, L, idx, cnt), sparse_decode(q, k, v, L)

    side = torch.cuda.Stream()  # compile and warm up outside the capture
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        decode()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = decode()
    for n in (1000, 64, 5000, 16383, 2049):
        L.fill_(n)
        start.fill_(n - T)
        graph.replay()
        idx, cnt = block_select(q, summaries, n - T, **sel)
        want = (idx, cnt, sparse_decode(q, k, v, n, idx, cnt), sparse_decode(q, k, v, n))
        assert all(torch.equal(got, ref) for got, ref in zip(outs, want)), n


def test_bench_attention_checks():
    """The checks of `infer bench --attention --check` pass (top-k has work to do at L = 4096 with this config)."""
    from infer.engine.measure.checks import attention_checks
    from infer.engine.config import SparseConfig

    results = attention_checks(L=4096, dtype=DTYPE, device=DEVICE, s=SparseConfig(topk=16, window_size=512))
    assert all(r.passed for r in results), [(r.name, r.detail) for r in results if not r.passed]


def test_demo_model_bf16_greedy_on_cuda_follows_cpu_fp32(smollm2):
    """SmolLM2 greedy on CUDA in bf16 against the CPU fp32 run: prints the matching prefix of 64 tokens per prompt."""
    from infer.engine.generate import Engine
    from infer.engine.sampling import SamplingParams

    prompts = ["What is the capital of France?", "Write a haiku about the sea.", "Explain why the sky is blue."]
    engines = {"cpu": Engine(smollm2, device="cpu", progress=False), "cuda": Engine(smollm2, device="cuda", progress=False)}
    for prompt in prompts:
        tokens = engines["cpu"].tokenizer.encode_chat([{"role": "user", "content": prompt}])
        answers = {}
        for name, engine in engines.items():
            text = "".join(engine.generate(tokens, SamplingParams(max_tokens=64)))
            answers[name] = engine.tokens[len(tokens):]
            print(f"{name}: {text!r}")
        same = next((i for i, (a, b) in enumerate(zip(answers["cpu"], answers["cuda"])) if a != b),
                    min(map(len, answers.values())))
        print(f"matching prefix: {same} of {len(answers['cpu'])} tokens for {prompt!r}")
        assert same >= min(8, len(answers["cpu"]))


def mostly_equal(got, ref, frac=0.99):
    """bf16 results rounded where the reference rounds: all but rare 1-ulp flips are bit-equal."""
    return (got == ref).float().mean().item() > frac


@pytest.mark.parametrize("T, hidden", [(1, 4096), (7, 576), (3, 8192)])
def test_rms_norm(T, hidden):
    from infer.kernels.norm import reference, rms_norm

    gen = torch.Generator().manual_seed(6)
    x, w = randn(T, hidden, gen=gen), 1 + 0.1 * randn(hidden, gen=gen)
    got, ref = rms_norm(x, w, 1e-6), reference(x, w, 1e-6)
    assert rel_err(got, ref) < 1e-2 and mostly_equal(got, ref)


@pytest.mark.parametrize("hidden", [4096, 896])
def test_rms_norm_rounds_as_round_x(hidden):
    """The RMSNorm's own rounding of its row (for the integer dot) equals round_x of its output, bit for bit."""
    from infer.kernels.norm import rms_norm
    from infer.kernels.quant import round_x

    gen = torch.Generator().manual_seed(hidden)
    x, w = 3 * randn(1, hidden, gen=gen), 1 + 0.1 * randn(hidden, gen=gen)
    out, rounded = rms_norm(x, w, 1e-6, round_x=True)
    assert torch.equal(out, rms_norm(x, w, 1e-6))
    for got, want in zip(rounded, round_x(out)):
        assert torch.equal(got, want)


@pytest.mark.parametrize("T, I", [(1, 14336), (5, 1536), (9, 4864)])
def test_silu_mul(T, I):
    from infer.kernels.activation import reference, silu_mul

    gen = torch.Generator().manual_seed(7)
    gate_up = 3 * randn(T, 2 * I, gen=gen)
    got, ref = silu_mul(gate_up), reference(gate_up)
    assert rel_err(got, ref) < 1e-2 and mostly_equal(got, ref)


@pytest.mark.parametrize("N, K, options", [(6144, 4096, {}), (4096, 14336, dict(gated=True, residual=True)),
                                        (1000, 896, dict(bias=True)), (4096, 4096, dict(residual=True, scale=0.2)),
                                        (151936, 896, {}), (128256, 4096, {})])
def test_gemv(N, K, options):
    from infer.kernels.gemv import argmax_buffer, gemv, reference, take_argmax

    gen = torch.Generator().manual_seed(8)
    scale = options.get("scale", 1.0)
    args = dict(x=3 * randn(1, 2 * K if options.get("gated") else K, gen=gen), weight=randn(N, K, gen=gen) / K ** 0.5,
                bias=randn(N, gen=gen) if options.get("bias") else None,
                gated=options.get("gated", False), residual=4 * randn(1, N, gen=gen) if options.get("residual") else None,
                residual_scale=scale)
    best, token = argmax_buffer(DEVICE), torch.zeros(1, dtype=torch.long, device=DEVICE)
    got, ref = gemv(**args, argmax=best), reference(**args)
    assert got.shape == (1, N) and rel_err(got, ref) < 1e-2 and mostly_equal(got, ref, 0.9)
    take_argmax(best, token)
    assert int(token) == int(got[0].float().argmax())


PACKED_TYPES = ["Q4_K", "Q5_K", "Q6_K", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"]


@pytest.mark.parametrize("qtype", PACKED_TYPES)
@pytest.mark.parametrize("N, K, options", [(6144, 4096, {}), (4096, 14336, dict(gated=True, residual=True)),
                                        (1000, 768, dict(bias=True)), (128256, 4096, {})])
def test_packed_gemv_and_skinny_gemm(qtype, N, K, options):
    """The packed kernels compiled for the GPU, bf16 activations, against the reference on the blocks' values."""
    from infer.kernels.gemv import argmax_buffer, gemv, integer_dot, reference, skinny_gemm, take_argmax
    from infer.kernels.quant import dequantize, quant_type, random_blocks, round_x, to_kernel_layout

    gen = torch.Generator(device=DEVICE).manual_seed(9)
    weight = to_kernel_layout(random_blocks(qtype, N, K, torch.device(DEVICE), std=1.0 / K ** 0.5, generator=gen),
                              qtype)
    bias = randn(N, gen=torch.Generator().manual_seed(1)) if options.get("bias") else None
    for T in (1, 5, 16):
        x = randn(T, 2 * K if options.get("gated") else K, gen=torch.Generator().manual_seed(T))
        residual = 4 * randn(T, N, gen=torch.Generator().manual_seed(2)) if options.get("residual") else None
        args = dict(bias=bias, gated=options.get("gated", False), residual=residual)
        ref = reference(x, weight, **args, qtype=qtype)
        if T == 1 and integer_dot(quant_type(qtype), weight.shape[1]):  # x rounded to 8 bits per 32, as round_x
            q, d, _ = round_x(x, args["gated"])  # (test_round_x checks it against its reference)
            x_hat = (q.float().reshape(-1, 32) * d[:, None]).reshape(1, -1)
            ref = reference(x_hat, weight, **dict(args, gated=False, residual=None), qtype=qtype).to(x.dtype)
            if residual is not None:  # added to the product rounded to x's dtype, as the kernel and `reference` do
                ref = (residual.float() + ref.float()).to(x.dtype)
        if T > 1:  # the skinny matmul multiplies weights rounded to x's dtype, as cuBLAS on dequantized ones would
            ref = reference(x, dequantize(weight, qtype, x.dtype), **args)
        if T == 1:
            best, token = argmax_buffer(DEVICE), torch.zeros(1, dtype=torch.long, device=DEVICE)
            got = gemv(x, weight, **args, argmax=best, qtype=qtype)
            take_argmax(best, token)
            assert int(token) == int(got[0].float().argmax())
        else:
            got = skinny_gemm(x, weight, qtype, **args)
        assert got.shape == (T, N) and rel_err(got, ref) < 1e-2 and mostly_equal(got, ref, 0.9), (T, rel_err(got, ref))


@pytest.mark.parametrize("gated", [False, True])
def test_round_x(gated):
    """round_x compiled for the GPU gives round_x_reference's x_hat bit for bit (exactly rounded divisions; a
    q one off at a near-tie would move every output of its column)."""
    from infer.kernels.activation import reference as silu_mul
    from infer.kernels.quant import round_x, round_x_reference

    for seed in range(4):
        x = randn(1, 2 * 14336 if gated else 14336, gen=torch.Generator().manual_seed(seed))
        q, d, _ = round_x(x, gated)
        want = round_x_reference((silu_mul(x) if gated else x)[0])
        assert torch.equal((q.float().reshape(-1, 32) * d[:, None]).reshape(-1), want)


@pytest.mark.parametrize("qtype", PACKED_TYPES)
def test_dequantize_is_exact(qtype):
    """The dequantize kernel (prefill's dequantize-then-cuBLAS, quantized embeddings) equals the reference bit for
    bit in fp32, rows gathered or not."""
    from infer.kernels.quant import dequantize, random_blocks, reference, to_kernel_layout

    gen = torch.Generator(device=DEVICE).manual_seed(3)
    file_blocks = random_blocks(qtype, 300, 1024, torch.device(DEVICE), std=1.0, generator=gen)
    ref = reference(file_blocks, qtype)
    blocks = to_kernel_layout(file_blocks, qtype)
    assert torch.equal(dequantize(blocks, qtype, torch.float32), ref)
    rows = torch.tensor([7, 0, 299, 7], device=DEVICE)
    assert torch.equal(dequantize(blocks, qtype, torch.float32, rows=rows), ref[rows])
    assert torch.equal(dequantize(blocks, qtype, torch.bfloat16), ref.to(torch.bfloat16))


def rope_inputs(Hq, Hkv, d, T, max_len, gen):
    """qkv [T, (Hq + 2Hkv) d], distinct random positions [T] reaching far (cos/sin of large arguments), inv_freq of
    theta 1e6, NaN caches [Hkv, max_len, d]."""
    qkv = randn(T, (Hq + 2 * Hkv) * d, gen=gen)
    positions = torch.cat([torch.tensor([max_len - 1]), torch.randperm(max_len - 1, generator=gen)[:T - 1]]).to(DEVICE)
    inv_freq = (1.0 / 1e6 ** (torch.arange(0, d, 2).float() / d)).to(DEVICE)
    k_cache = torch.full((Hkv, max_len, d), float("nan"), dtype=DTYPE, device=DEVICE)
    return qkv, positions, inv_freq, k_cache, k_cache.clone()


@pytest.mark.parametrize("Hq, Hkv, d, T, qk_norm", [(32, 8, 128, 1, False), (14, 2, 64, 9, False),
                                                    (16, 8, 128, 4, True), (8, 8, 64, 3, True)])
def test_rope_append(Hq, Hkv, d, T, qk_norm):
    from infer.kernels.rope_append import reference, rope_append

    gen = torch.Generator().manual_seed(8)
    qkv, positions, inv_freq, k_cache, v_cache = rope_inputs(Hq, Hkv, d, T, 131072, gen)
    norms = dict(q_norm_weight=1 + 0.2 * randn(d, gen=gen), k_norm_weight=1 + 0.2 * randn(d, gen=gen),
                 eps=1e-6) if qk_norm else {}
    ref_k, ref_v = k_cache.clone(), v_cache.clone()
    args = (Hq, Hkv, d)
    ref_q = reference(qkv, positions, inv_freq, 1.2, ref_k, ref_v, *args, **norms)
    q = rope_append(qkv, positions, inv_freq, 1.2, k_cache, v_cache, *args, **norms)
    assert rel_err(q, ref_q) < 1e-2 and mostly_equal(q, ref_q)
    got_k, want_k = k_cache[:, positions], ref_k[:, positions]
    assert rel_err(got_k, want_k) < 1e-2 and mostly_equal(got_k, want_k)
    assert torch.equal(v_cache[:, positions], ref_v[:, positions])
    assert k_cache.isnan().sum() == ref_k.isnan().sum()  # nothing else written


@pytest.mark.parametrize("T", [1, 5, 300])
def test_rope_append_pools_the_windows_its_keys_complete(T):
    """Consecutive calls of T tokens near 128K write the summary of each window they complete, as pool_keys
    computes it from the cache they leave, and no other."""
    from infer.kernels.pool_keys import num_summaries, reference as pool_reference
    from infer.kernels.rope_append import rope_append

    Hq, Hkv, d, max_len = 32, 8, 128, 131072
    gen = torch.Generator().manual_seed(T)
    start = max_len - 3 * T - 7
    k_cache = torch.full((Hkv, max_len, d), float("nan"), dtype=DTYPE, device=DEVICE)
    k_cache[:, start - 64:start] = randn(Hkv, 64, d, gen=gen)  # the keys before: only windows' tails matter
    v_cache = k_cache.clone()
    summaries = torch.full((Hkv, num_summaries(max_len), d), float("nan"), dtype=DTYPE, device=DEVICE)
    inv_freq = (1.0 / 5e5 ** (torch.arange(0, d, 2).float() / d)).to(DEVICE)
    done = num_summaries(start)
    for L in range(start, start + 3 * T, T):
        qkv = randn(T, (Hq + 2 * Hkv) * d, gen=gen)
        positions = torch.arange(L, L + T, device=DEVICE, dtype=torch.int32)
        rope_append(qkv, positions, inv_freq, 1.0, k_cache, v_cache, Hq, Hkv, d, summaries=summaries)
        written = num_summaries(L + T)
        if written > done:
            want = pool_reference(k_cache, done, written)
            assert rel_err(summaries[:, done:written], want) < 1e-2 and mostly_equal(summaries[:, done:written], want)
        assert summaries[:, :num_summaries(start)].isnan().all() and summaries[:, written:].isnan().all()
        done = written


def test_rope_append_cuda_graph_replays_at_new_positions():
    from infer.kernels.rope_append import reference, rope_append

    Hq, Hkv, d, T, max_len = 8, 2, 128, 3, 5000
    gen = torch.Generator().manual_seed(9)
    qkv, positions, inv_freq, k_cache, v_cache = rope_inputs(Hq, Hkv, d, T, max_len, gen)
    args = (inv_freq, 1.0, k_cache, v_cache, Hq, Hkv, d)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compile outside the capture
        rope_append(qkv, positions, *args)
    torch.cuda.current_stream().wait_stream(side)
    k_cache.fill_(float("nan"))
    v_cache.fill_(float("nan"))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        q = rope_append(qkv, positions, *args)
    ref_k, ref_v = k_cache.clone(), v_cache.clone()  # as the capture left them
    for new in ([10, 11, 12], [4999, 0, 2500], [700, 3, 4096]):
        qkv.copy_(randn(*qkv.shape, gen=gen))
        positions.copy_(torch.tensor(new))
        graph.replay()
        ref_q = reference(qkv, positions, inv_freq, 1.0, ref_k, ref_v, Hq, Hkv, d)
        assert rel_err(q, ref_q) < 1e-2 and mostly_equal(q, ref_q)
    torch.testing.assert_close(k_cache, ref_k, equal_nan=True, rtol=1e-2, atol=1e-2)
    assert torch.equal(v_cache.nan_to_num(), ref_v.nan_to_num())  # only the replayed positions were written
    assert k_cache.isnan().sum() == ref_k.isnan().sum()
