import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: run the kernels on CPU

import math

import pytest
import torch

import infer.kernels.block_select as block_select_module
from infer.kernels.block_select import (
    TUNING, Tuning, block_scores, block_select, max_selected, new_tickets, reference, reference_scores, select_blocks,
)
from infer.kernels.pool_keys import num_summaries

# (Hkv, G, d, q_start, T, q_tile, dtype, geometry: kernel/stride/block_size overrides).
# fp16/fp32 only: tl.dot on bf16 is wrong under the triton interpreter.
CASES = [
    (2, 1, 64, 0, 200, 64, torch.float32, {}),  # prefill from 0, ragged T, MHA
    (2, 2, 128, 333, 77, 32, torch.float16, {}),  # chunked prefill
    (1, 4, 64, 1290, 1, 64, torch.float16, {}),  # decode, summaries split over programs
    (1, 8, 64, 4100, 1, 64, torch.float16, {}),  # decode, longer
    (2, 8, 64, 517, 45, 16, torch.float16, {}),  # GQA 8, several tiles
    (1, 4, 64, 1290, 40, 16, torch.float16, {}),  # several chunks of summaries
    (1, 3, 64, 100, 50, 16, torch.float32, {}),  # group size not a power of two
    (1, 2, 64, 150, 60, 16, torch.float16, dict(kernel=16, stride=8, block_size=32)),
    (1, 4, 64, 1000, 9, 16, torch.float16, dict(kernel=16, stride=16)),  # windows that do not overlap
    (2, 2, 64, 0, 20, 64, torch.float16, {}),  # fewer keys than one window: no summaries
]


def make_inputs(Hkv, G, d, q_start, T, dtype, kernel=32, stride=16, seed=0, spare=5):
    g = torch.Generator().manual_seed(seed)
    C = num_summaries(q_start + T, kernel, stride)
    q = torch.randn(Hkv * G, T, d, generator=g).to(dtype)  # [Hq, T, d]
    summaries = torch.full((Hkv, C + spare, d), float("nan"), dtype=dtype)  # [Hkv, max_summaries, d]
    summaries[:, :C] = torch.randn(Hkv, C, d, generator=g).to(dtype)  # past C: never read
    return q, summaries


def forced_blocks(q_start, T, i, q_tile, block_size, init_blocks, window):
    p_lo, p_hi = q_start + i * q_tile, q_start + min((i + 1) * q_tile, T) - 1
    return {b for b in range(p_hi // block_size + 1) if b < init_blocks or (b + 1) * block_size > p_lo - window + 1}


def check_selection(got, ref, ref_scores, q_start, T, q_tile, block_size, init_blocks, window, tol=1e-5):
    """got == ref up to ties: a block chosen by one side only must tie (within tol) with one chosen by the other."""
    (idx, cnt), (ref_idx, ref_cnt) = got, ref
    assert idx.dtype == cnt.dtype == torch.int32 and idx.shape == ref_idx.shape
    assert torch.equal(cnt, ref_cnt)
    Hkv, n_tiles, max_sel = idx.shape
    for g in range(Hkv):
        for i in range(n_tiles):
            n = int(cnt[g, i])
            row = idx[g, i].tolist()
            assert row[:n] == sorted(row[:n]) and len(set(row[:n])) == n and row[n:] == [-1] * (max_sel - n)
            sel, ref_sel = set(row[:n]), set(ref_idx[g, i, :n].tolist())
            assert forced_blocks(q_start, T, i, q_tile, block_size, init_blocks, window) <= sel
            s = ref_scores[g, i]
            for a in sel - ref_sel:
                assert all(abs(float(s[a] - s[b])) <= tol for b in ref_sel - sel), (g, i, sel, ref_sel)


TUNINGS = {
    "default": TUNING,
    "one split": Tuning(target_programs=1),  # each program loops over all its summary chunks
    "small blocks": Tuning(lse_rows=16, col_rows=16, lse_block_c=16,
                           col_block_c=16),  # several t-blocks per tile, several chunks per split
    "query-major rows": Tuning(head_major=False),
    "chunked select": Tuning(select_lanes=16),  # decode: 16 blocks a chunk
}
TICKETS = new_tickets(torch.device("cpu"))  # the counters of the chunked selects (each call leaves them at 0)


def lanes(n: int) -> Tuning:
    return Tuning(select_lanes=n)


@pytest.mark.parametrize("tuning", TUNINGS)
@pytest.mark.parametrize("Hkv, G, d, q_start, T, q_tile, dtype, geo", CASES)
def test_scores_match_reference(Hkv, G, d, q_start, T, q_tile, dtype, geo, tuning):
    q, summaries = make_inputs(Hkv, G, d, q_start, T, dtype, **{k: v for k, v in geo.items() if k != "block_size"})
    got = block_scores(q, summaries, q_start, q_tile=q_tile, tuning=TUNINGS[tuning], **geo)
    ref = reference_scores(q, summaries, q_start, q_tile=q_tile, **geo)
    assert got.shape == ref.shape
    assert torch.equal(torch.isfinite(got), torch.isfinite(ref))
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-6)  # -inf must match -inf


# 16 lanes: decode (few queries) selects per chunk of 16 blocks, then among the chunks' top ones
LANE_CASES = [(*case, 1024) for case in CASES] + [(*case, 16) for case in CASES if case[4] <= 16]


@pytest.mark.parametrize("Hkv, G, d, q_start, T, q_tile, dtype, geo, n_lanes", LANE_CASES)
@pytest.mark.parametrize(
    "topk, window, init_blocks",
    [(4, 100, 1), (3, 2048, 1), (2, 40, 2), (100, 64, 1)],  # topk < / > blocks, window < / > sequence
)
def test_select_matches_reference(Hkv, G, d, q_start, T, q_tile, dtype, geo, n_lanes, topk, window, init_blocks):
    """block_select (Triton) and select_blocks (torch, on the reference scores) both agree with `reference`."""
    q, summaries = make_inputs(Hkv, G, d, q_start, T, dtype, **{k: v for k, v in geo.items() if k != "block_size"})
    block_size = geo.get("block_size", 64)
    sel = dict(q_tile=q_tile, topk=topk, window=window, init_blocks=init_blocks, **geo)
    ref = reference(q, summaries, q_start, **sel)
    ref_scores = reference_scores(q, summaries, q_start, q_tile=q_tile, **geo)
    for got in (block_select(q, summaries, q_start, **sel, tickets=TICKETS, tuning=lanes(n_lanes)),
                select_blocks(ref_scores, q_start, T, block_size, q_tile, topk, init_blocks, window)):
        check_selection(got, ref, ref_scores, q_start, T, q_tile, block_size, init_blocks, window)


@pytest.mark.parametrize("q_start, T, window", [(0, 300, 1), (700, 130, 64), (1000, 1, 2048)])
def test_topk_at_least_blocks_selects_every_causal_block(q_start, T, window):
    q, summaries = make_inputs(2, 2, 64, q_start, T, torch.float32)
    L = q_start + T
    topk = math.ceil(L / 64)
    for idx, cnt in (reference(q, summaries, q_start, topk=topk, window=window),
                     block_select(q, summaries, q_start, topk=topk, window=window)):
        for i in range(idx.shape[1]):
            n_causal = (q_start + min((i + 1) * 64, T) - 1) // 64 + 1
            assert (cnt[:, i] == n_causal).all()
            assert (idx[:, i, :n_causal] == torch.arange(n_causal, dtype=torch.int32)).all()
            assert (idx[:, i, n_causal:] == -1).all()


def test_forced_blocks_beyond_topk_are_all_kept():
    q_start, T, topk, window = 2000, 64, 4, 1000
    assert max_selected(topk, window) == 1 + 17 + 1
    q, summaries = make_inputs(1, 2, 64, q_start, T, torch.float16)
    idx, cnt = block_select(q, summaries, q_start, topk=topk, window=window)
    forced = sorted(forced_blocks(q_start, T, 0, 64, 64, 1, window))  # block 0 and blocks 15..32
    assert len(forced) > topk and cnt.tolist() == [[len(forced)]]
    assert idx[0, 0].tolist() == forced + [-1] * (idx.shape[2] - len(forced))


def test_unscored_blocks_are_never_chosen():
    # A hand-made score buffer: block 2 has no score, blocks 1 and 3 do; block 4 is the local window.
    scores = torch.tensor([[[-math.inf, 0.5, -math.inf, 0.25, -math.inf]]])  # [Hkv=1, n_tiles=1, n_blocks=5]
    idx, cnt = select_blocks(scores, q_start=300, T=1, topk=5, window=1, init_blocks=1)
    assert cnt.tolist() == [[4]] and idx[0, 0, :5].tolist() == [0, 1, 3, 4, -1]


@pytest.mark.parametrize("window, first", [(236, 1), (237, 1), (238, 0), (1, 4), (2048, 0)])
def test_local_window_edges(window, first):
    # Query at position 300 (block 4); the window [301 - window, 300] starts in block `first`.
    scores = torch.full((1, 1, 5), -math.inf)  # nothing scored: exactly the forced blocks are chosen
    idx, cnt = select_blocks(scores, q_start=300, T=1, topk=1, window=window, init_blocks=0)
    assert idx[0, 0, : int(cnt)].tolist() == list(range(first, 5))


@pytest.mark.parametrize("n_lanes", [1024, 16])
@pytest.mark.parametrize("T", [1, 3])
def test_ties_go_to_the_lowest_blocks(T, n_lanes):
    """Equal summaries give every visible block the same score: the radix select runs all its steps and the
    lowest unforced blocks fill the top-k (with chunks: in each chunk, then overall)."""
    q, summaries = make_inputs(1, 4, 64, 4100, T, torch.float32)
    C = num_summaries(4100 + T)
    summaries[:, :C] = summaries[:, :1]
    sel = dict(q_tile=16, topk=9, window=100)
    got = block_select(q, summaries, 4100, **sel, tickets=TICKETS, tuning=lanes(n_lanes))
    ref = reference(q, summaries, 4100, **sel)
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
    assert got[0][0, 0, :9].tolist() == [0, 1, 2, 3, 4, 5, 62, 63, 64]  # sink, the lowest ties, the window


def device_start(q_start):
    return torch.tensor([q_start], dtype=torch.int32)  # [1]


# (Hkv, G, d, q_start, T, q_tile, dtype, geometry): decode and verification, the device q_start's cases
DECODE_CASES = [
    (1, 4, 64, 1290, 1, 16, torch.float16, {}),
    (2, 2, 64, 700, 4, 16, torch.float32, {}),
    (1, 8, 64, 4100, 1, 64, torch.float16, {}),
    (2, 1, 64, 3, 5, 16, torch.float16, {}),  # no summaries yet
    (1, 2, 64, 150, 8, 16, torch.float16, dict(kernel=16, stride=8, block_size=32)),
    (2, 4, 64, 2000, 1, 16, torch.float16, dict(kernel=16, stride=16)),
]


@pytest.mark.parametrize("tuning", TUNINGS)
@pytest.mark.parametrize("Hkv, G, d, q_start, T, q_tile, dtype, geo", DECODE_CASES)
def test_device_start_equals_int(Hkv, G, d, q_start, T, q_tile, dtype, geo, tuning):
    """Sized to the capacity (300 spare summaries: more splits and blocks than live), the same bits."""
    kernel, stride, block_size = geo.get("kernel", 32), geo.get("stride", 16), geo.get("block_size", 64)
    q, summaries = make_inputs(Hkv, G, d, q_start, T, dtype, kernel, stride, spare=300)
    sel = dict(q_tile=q_tile, topk=3, window=100, tickets=TICKETS, tuning=TUNINGS[tuning], **geo)
    n_blocks = math.ceil((q_start + T) / block_size)
    n_cap = math.ceil((summaries.shape[1] * stride + kernel - 1) / block_size)
    ref_scores = torch.full((Hkv, 1, n_blocks), math.nan)
    got_scores = torch.full((Hkv, 1, n_cap), math.nan)
    ref = block_select(q, summaries, q_start, scores=ref_scores, **sel)
    got = block_select(q, summaries, device_start(q_start), scores=got_scores, **sel)
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
    assert torch.equal(got_scores[..., :n_blocks], ref_scores) and got_scores[..., n_blocks:].isnan().all()


class GridLog:
    """Stands in for a kernel: notes each launch grid, then launches."""

    def __init__(self, kernel, grids):
        self.kernel, self.grids = kernel, grids

    def __getitem__(self, grid):
        self.grids.append(grid)
        return self.kernel[grid]


def test_one_device_start_many_values(monkeypatch):
    """One start tensor rewritten between calls (as a replayed CUDA graph does): the same grids and output shapes
    at every length, and each call selects as the int call at the length the tensor holds."""
    grids = []
    for name in ("_lse_kernel", "_column_kernel", "_select_from_logits_kernel", "_select_from_columns_kernel"):
        monkeypatch.setattr(block_select_module, name, GridLog(getattr(block_select_module, name), grids))
    q, summaries = make_inputs(2, 4, 64, 1535, 1, torch.float16)  # 95 live + 5 spare summaries: up to 1631 keys
    sel = dict(q_tile=16, topk=4, window=200)
    start = device_start(0)
    for max_len, n_blocks in ((None, 26), (1536, 24)):
        launches = []
        for q_start in (1535, 10, 40, 700, 1290, 1500):
            ref = block_select(q, summaries, q_start, **sel)
            start.fill_(q_start)
            grids.clear()
            scores = torch.full((2, 1, n_blocks), math.nan)  # the capacity's width
            got = block_select(q, summaries, start, scores=scores, max_len=max_len, **sel)
            launches.append((grids[:], got[0].shape))
            assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
        assert all(launch == launches[0] for launch in launches)


@pytest.mark.parametrize("n_lanes", [1024, 16])
@pytest.mark.parametrize("Hkv, G, d, q_start, T, dtype, geo", [
    (1, 4, 64, 1290, 5, torch.float16, {}),
    (2, 2, 64, 700, 8, torch.float32, {}),
    (2, 1, 64, 3, 4, torch.float16, {}),  # the first queries see no summary yet
    (1, 2, 64, 150, 3, torch.float16, dict(kernel=16, stride=8, block_size=32)),
])
def test_per_query_equals_each_query_alone(Hkv, G, d, q_start, T, dtype, geo, n_lanes):
    """Verification selects for each draft in one call: the bits of a call for that query alone."""
    kernel, stride = geo.get("kernel", 32), geo.get("stride", 16)
    q, summaries = make_inputs(Hkv, G, d, q_start, T, dtype, kernel, stride, spare=300)
    sel = dict(q_tile=16, topk=3, window=100, tickets=TICKETS, tuning=lanes(n_lanes), **geo)
    starts = torch.arange(q_start, q_start + T, dtype=torch.int32)
    idx, cnt = block_select(q, summaries, starts, per_query=True, **sel)
    assert idx.shape[:2] == cnt.shape == (Hkv, T)
    for i in range(T):
        alone_idx, alone_cnt = block_select(q[:, i:i + 1], summaries, starts[i:i + 1], **sel)
        assert torch.equal(idx[:, i:i + 1], alone_idx) and torch.equal(cnt[:, i:i + 1], alone_cnt)
