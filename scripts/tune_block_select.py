"""Tuning run for the GPU block selection (branch block-select-v2; needs CUDA): every TUNING variant is checked
against reference_scores (a 1024-query prefill slice and a decode step at 128K) and timed on the 128K prefill
selection (8 chunks of 16K queries), then the decode variants (programs), a kernel breakdown, and
finally `infer bench --attention --check --context 32768,131072` with the fastest prefill variant.

    python3 scripts/tune_block_select.py 2>&1 | tee tune.log
"""

import dataclasses
import math

import torch
import triton
from torch.profiler import ProfilerActivity, profile

from infer.cli.main import main
from infer.engine.attention import DECODE_Q_TILE
from infer.engine.measure import compare, layer
from infer.engine.config import SparseConfig
from infer.kernels import block_select as bs
from infer.kernels import pool_keys

VARIANTS = {
    "default": {},
    "col rows 128, c128, 8 warps": dict(col_block_c=128, col_warps=8),
    "col rows 256, 8 warps": dict(col_rows=256, col_warps=8),
    "col rows 256, 8 warps, query-major": dict(col_rows=256, col_warps=8, head_major=False),
    "query-major": dict(head_major=False),
    "lse rows 256, c32": dict(lse_rows=256, lse_block_c=32),
    "lse rows 256, 8 warps": dict(lse_rows=256, lse_warps=8),
    "2 stages": dict(num_stages=2),
}


def ms(fn, rep=300):
    return triton.testing.do_bench(fn, warmup=50, rep=rep, return_mode="median")


def graph_ms(fn):
    return triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median")


def kernel_times(fn, label, iters=1):
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    print(f"--- {label}: device time per call (us)")
    rows = [(e.self_device_time_total / iters, e.count // iters, e.key) for e in prof.key_averages()
            if e.self_device_time_total > 0]
    for t, count, name in sorted(rows, reverse=True)[:8]:
        print(f"  {t:10.1f}  x{count:<3d} {name[:70]}")


def run():
    s = SparseConfig()
    n, chunk = 131072, 16384
    q, k, v = layer.attention_inputs(n, 32, 8, 128, torch.bfloat16, "cuda")
    summaries = layer.new_summaries(k, s)
    pool_keys.pool_keys(k, summaries, 0, pool_keys.num_summaries(n, s.kernel_size, s.kernel_stride), s.kernel_size,
                        s.kernel_stride)
    # the config's geometry and budget, not the kernels' defaults (MiniCPM4's)
    geometry = dict(kernel=s.kernel_size, stride=s.kernel_stride, block_size=s.block_size)
    budget = dict(topk=s.topk, init_blocks=s.init_blocks, window=s.window_size)
    q1 = q[:, -1:].contiguous()
    slices = [(q[:, 7168:8192], 7168, s.block_size), (q1, n - 1, DECODE_Q_TILE)]  # the reference materializes [T, blocks, C]
    refs = [bs.reference_scores(qs, summaries, start, q_tile=qt, **geometry) for qs, start, qt in slices]

    def check(tuning):
        out = []
        for (qs, start, qt), ref in zip(slices, refs):
            got = torch.full_like(ref, float("nan"))
            gi, gc = bs.block_select(qs, summaries, start, q_tile=qt, scores=got, tuning=tuning,
                                     tickets=bs.new_tickets(qs.device), **geometry, **budget)
            ri, rc = bs.select_blocks(ref, start, qs.shape[1], q_tile=qt, block_size=s.block_size, **budget)
            fin = ref.isfinite()
            ok = not got.isnan().any().item() and torch.equal(fin, got.isfinite())
            err = compare.rel_err(got[fin], ref[fin]) if ok else math.inf
            gm, rm = (layer.selection_mask(i, c, ref.shape[2]) for i, c in ((gi, gc), (ri, rc)))
            out.append(f"rel err {err:.1e}, overlap {((gm & rm).sum() / rm.sum()).item():.5f}, "
                       f"same counts {torch.equal(gc, rc)}")
        return " | ".join(out)

    def prefill_selection(tuning):
        for a in range(0, n, chunk):
            layer.select_chunk(q[:, a:a + chunk], summaries, a, s, tuning)

    with torch.inference_mode():
        best, best_ms = bs.TUNING, math.inf
        for name, over in VARIANTS.items():
            tuning = dataclasses.replace(bs.TUNING, **over)
            try:
                t = ms(lambda: prefill_selection(tuning))
                print(f"prefill 128K selection [{name}]: {t:.2f} ms; {check(tuning)}", flush=True)
                best, best_ms = (tuning, t) if t < best_ms else (best, best_ms)
            except Exception as e:  # a variant that does not compile: report, go on
                print(f"prefill 128K selection [{name}] failed: {type(e).__name__}: {str(e)[:2000]}", flush=True)
        print("fastest prefill tuning:", best, flush=True)
        kernel_times(lambda: prefill_selection(best), "prefill 128K selection")

        tickets = bs.new_tickets(q1.device)
        for programs in (256, 512):
            tuning = dataclasses.replace(bs.TUNING, target_programs=programs)
            decode_select = lambda: layer.decode_select(q1, summaries, n, s, tickets=tickets, tuning=tuning)
            decode_step = layer.sparse_decode_step(q1, k, v, summaries, s, tuning)
            print(f"decode 128K [{programs} programs]: selection eager "
                  f"{1000 * ms(decode_select, 100):.1f} us, graph {1000 * graph_ms(decode_select):.1f} us; "
                  f"step graph {1000 * graph_ms(decode_step):.1f} us; {check(tuning)}", flush=True)
        kernel_times(layer.sparse_decode_step(q1, k, v, summaries, s), "decode 128K step", iters=20)
    del q, k, v, summaries, q1, slices, refs
    torch.cuda.empty_cache()
    main(["bench", "--attention", "--check", "--context", "32768,131072"])


if __name__ == "__main__":
    run()
