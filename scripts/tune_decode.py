"""Tuning run for decoding (needs CUDA). With --gemv: kernels.gemv configurations checked against the fp32 reference
and timed against cuBLAS (F.linear) on the Llama-3-8B projections, weights rotated through enough copies that L2
does not help; then the same for packed GGUF weights of each type in --types (random blocks): the one-row GEMV over
a small sweep of block_n / warps, next to the dense bf16 GEMV and cuBLAS, and skinny_gemm at 2, 4 and 8 rows
against dequantizing the weight and calling cuBLAS. Then a kernel breakdown of one graphed Llama-3-8B decode step
(random weights) at depths 0, 32K and 128K (sparse attention past 8192 tokens), and its wall time with and without
programmatic dependent launch.

    python3 scripts/tune_decode.py [--gemv [--types Q4_K,Q8_0]] [--select] [--only] 2>&1 | tee tune.log

--select also times the decode block selection at 32K and 128K before the breakdown; --only stops before it.
"""

import argparse
import itertools
import math

import torch
import torch.nn.functional as F
import triton
from torch.profiler import ProfilerActivity, profile

from infer.engine.attention import DECODE_Q_TILE
from infer.engine.measure import bench, compare, layer
from infer.engine.config import SparseConfig
from infer.kernels import activation, gemv, pdl, quant

DEVICE, DTYPE = "cuda", torch.bfloat16
SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336),
          "lm_head": (128256, 4096)}
CONFIGS = [dict(block_n=bn, block_k=bk, num_warps=w) for bn, bk, w in itertools.product((4, 8, 16), (512, 1024, 2048), (4, 8))]
PACKED_TYPES = ("Q4_K", "Q5_K", "Q6_K", "Q8_0", "Q4_0", "Q5_0")
PACKED_CONFIGS = [dict(block_n=bn, num_warps=w) for bn, w in itertools.product((2, 4, 8), (4, 8))]
SKINNY_ROWS = (2, 4, 8)
L2_ROTATION_BYTES = 300e6  # weights rotated per timed call: enough copies that L2 does not help


def per_call_us(fn, weights, x) -> float:
    """Median time of one call over len(weights) distinct weights, replayed from a CUDA graph."""
    run = lambda: [fn(x, w) for w in weights]
    return 1000 * triton.testing.do_bench_cudagraph(run, rep=30, return_mode="median") / len(weights)


def copies(nbytes: int) -> int:
    return max(2, math.ceil(L2_ROTATION_BYTES / nbytes))


def gemv_table() -> dict[str, tuple[float, float]]:
    """The dense table; returns each shape's cuBLAS and default-config GEMV us."""
    rows, times = [], {}
    for name, (n, k) in SHAPES.items():
        nbytes = 2 * n * k
        weights = [torch.randn(n, k, device=DEVICE, dtype=DTYPE) * 0.02 for _ in range(copies(nbytes))]
        gated = name == "down"  # the engine's down projection reads silu(gate) * up of x = [gate | up]
        x = torch.randn(1, 2 * k if gated else k, device=DEVICE, dtype=DTYPE)
        options = dict(gated=True) if gated else {}
        ref = gemv.reference(x, weights[0], **options)
        results = [("cublas", per_call_us(F.linear, weights, x[:, :k]), math.nan)]
        for cfg in CONFIGS:
            f = lambda x, w, cfg=cfg: gemv.gemv(x, w, **options, **cfg)
            results.append((str(cfg), per_call_us(f, weights, x), compare.rel_err(f(x, weights[0]), ref)))
        results.sort(key=lambda r: r[1])
        cublas = next(r for r in results if r[0] == "cublas")
        print(f"--- {name} [{n}x{k}]{' gated' if gated else ''}: cuBLAS (not gated) {cublas[1]:.1f} us = "
              f"{nbytes / cublas[1] / 1e6:.2f} TB/s", flush=True)
        for label, us, err in results[:5]:
            print(f"  {us:8.1f} us {nbytes / us / 1e6:5.2f} TB/s  err {err:.1e}  {label}", flush=True)
        rows.append((name, cublas[1], results[0]))
        default = str(dict(block_n=4, block_k=1024, num_warps=8 if gated else 4))
        times[name] = (cublas[1], next(r[1] for r in results if r[0] == default))
        del weights
        torch.cuda.empty_cache()
    print("\nshape    cuBLAS us  best us  best TB/s  best")
    for name, cub, (label, us, err) in rows:
        print(f"{name:8s} {cub:9.1f} {us:8.1f} {2 * SHAPES[name][0] * SHAPES[name][1] / us / 1e6:9.2f}  {label}")
    return times


def random_packed(qt: quant.QuantType, n: int, k: int) -> torch.Tensor:
    """uint8 [n, row_bytes] of random qt blocks with finite scales below 2^-7: every fp16 field of the PACKED_TYPES
    starts at an even byte of a block of even size, so clearing bits 5 and 6 of every odd byte caps its exponent."""
    w = torch.randint(0, 256, (n, k // qt.block_elems * qt.block_bytes), dtype=torch.uint8, device=DEVICE)
    w[:, 1::2] &= 0x9F
    return w


def packed_table(types: list[str], dense: dict[str, tuple[float, float]]):
    """Per shape and type: the packed GEMV (default config and the best of PACKED_CONFIGS, TB/s of packed bytes)
    next to the dense GEMV and cuBLAS of `dense`; skinny_gemm at SKINNY_ROWS against dequantize + cuBLAS."""
    table = []
    for (name, (n, k)), tname in itertools.product(SHAPES.items(), types):
        qt = quant.quant_type(tname)
        nbytes = n * k // qt.block_elems * qt.block_bytes
        weights = [random_packed(qt, n, k) for _ in range(copies(nbytes))]
        gated = name == "down"
        x = torch.randn(1, 2 * k if gated else k, device=DEVICE, dtype=DTYPE)
        ref = gemv.reference(x, weights[0], gated=gated, qtype=qt)
        default = dict(block_n=4, num_warps=8 if gated else 4)  # gemv's defaults
        results = []
        for cfg in PACKED_CONFIGS:
            f = lambda x, w, cfg=cfg: gemv.gemv(x, w, gated=gated, qtype=qt, **cfg)
            results.append((cfg, per_call_us(f, weights, x), bench.rel_err(f(x, weights[0]), ref)))
        ours = next(r for r in results if r[0] == default)
        best = min(results, key=lambda r: r[1])
        print(f"--- {name} [{n}x{k}]{' gated' if gated else ''} {tname}: {nbytes / 1e6:.1f} MB, dense GEMV "
              f"{dense[name][1]:.1f} us, cuBLAS {dense[name][0]:.1f} us", flush=True)
        for cfg, us, err in sorted(results, key=lambda r: r[1]):
            print(f"  {us:8.1f} us {nbytes / us / 1e6:5.2f} TB/s  err {err:.1e}  {cfg}", flush=True)
        skinny = []
        for T in SKINNY_ROWS:
            xs = torch.randn(T, x.shape[1], device=DEVICE, dtype=DTYPE)
            f = lambda x, w: gemv.skinny_gemm(x, w, qt, gated=gated)
            g = lambda x, w: F.linear(activation.silu_mul(x) if gated else x, quant.dequantize(w, qt, DTYPE))
            err = bench.rel_err(f(xs, weights[0]), gemv.reference(xs, weights[0], gated=gated, qtype=qt))
            skinny.append((per_call_us(f, weights, xs), per_call_us(g, weights, xs)))
            print(f"  skinny T={T}: {skinny[-1][0]:8.1f} us (err {err:.1e}), dequantize + cuBLAS "
                  f"{skinny[-1][1]:8.1f} us", flush=True)
        table.append((name, tname, nbytes, ours[1], best, dense[name], skinny))
        del weights
        torch.cuda.empty_cache()
    print("\nPacked GEMV (default config, and the best one) against the dense bf16 GEMV and cuBLAS; skinny_gemm at "
          "T rows (in parentheses: dequantize + cuBLAS)")
    print(f"{'shape':8s} {'type':5s} {'MB':>6s} {'gemv us':>8s} {'TB/s':>5s} {'best us':>8s} {'TB/s':>5s} "
          f"{'best config':19s} {'dense us':>8s} {'cuBLAS us':>9s}"
          + "".join(f" {f'T={T} us':>17s}" for T in SKINNY_ROWS))
    for name, tname, nbytes, us, (cfg, best_us, _), (cublas, dense_us), skinny in table:
        label = f"block_n={cfg['block_n']} warps={cfg['num_warps']}"
        print(f"{name:8s} {tname:5s} {nbytes / 1e6:6.1f} {us:8.1f} {nbytes / us / 1e6:5.2f} {best_us:8.1f} "
              f"{nbytes / best_us / 1e6:5.2f} {label:19s} {dense_us:8.1f} {cublas:9.1f}"
              + "".join(f" {f'{s:.1f} ({d:.1f})':>17s}" for s, d in skinny))


def select_table():
    """The decode block selection (one query, device start, replayed from a CUDA graph) at 32K and 128K, with
    caches of the bench's capacity (+144) and of exactly 128K; it must pick the blocks the int-start call picks."""
    from infer.kernels import block_select, pool_keys

    s = SparseConfig()
    for length, capacity in ((32768, 32768 + 144), (131072, 131072 + 144), (131072, 131072)):
        q, k, _ = layer.attention_inputs(capacity, 32, 8, 128, torch.bfloat16, "cuda")
        q = q[:, :1].contiguous()
        summaries = layer.new_summaries(k, s)
        pool_keys.pool_keys(k, summaries, 0, pool_keys.num_summaries(length), s.kernel_size, s.kernel_stride)
        start = torch.tensor([length - 1], dtype=torch.int32, device="cuda")
        geometry = (s.kernel_size, s.kernel_stride, s.block_size, DECODE_Q_TILE, s.topk, s.init_blocks,
                    s.window_size)
        want = layer.decode_select(q, summaries, length, s)  # sized to the live keys
        tickets = block_select.new_tickets(q.device)
        call = lambda: block_select.block_select(q, summaries, start, *geometry, max_len=capacity, tickets=tickets)
        got = call()
        same = torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        us = 1000 * triton.testing.do_bench_cudagraph(call, rep=50, return_mode="median")
        print(f"select L={length} capacity {capacity}: {us:.1f} us{'' if same else ' WRONG BLOCKS'}", flush=True)
        del q, k, summaries
        torch.cuda.empty_cache()


def decode_breakdown(model, depth: int, steps: int = 20):
    """Device time per kernel of one graphed decode step at `depth` (sparse attention past 8192 tokens), profiled
    without programmatic dependent launch (with it, a kernel's time includes its wait for the one before), then the
    step's wall time with and without it."""
    cache, _ = bench.decode_at_depth(model, depth, 64, SparseConfig())
    tokens = torch.zeros(1, dtype=torch.long, device="cuda")
    pdl_enabled, walls = pdl.enabled, {}
    for use_pdl in (False, True):  # a fresh graph each: the kernels compile with and without PDL
        pdl.enabled = lambda device, use_pdl=use_pdl: use_pdl and pdl_enabled(device)
        graphed = bench.GraphedDecode(model, cache)

        def step():
            cache.length = depth
            graphed(tokens)

        for _ in range(3):
            step()
        torch.cuda.synchronize()
        if not use_pdl:
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(steps):
                    step()
                torch.cuda.synchronize()
            rows = [(e.self_device_time_total / steps, e.count // steps, e.key) for e in prof.key_averages()
                    if e.self_device_time_total > 0]
            total = sum(r[0] for r in rows)
            print(f"\n--- graphed decode step, llama3-8b, depth {depth}: kernel time {total:.0f} us per step")
            for t, count, name in sorted(rows, reverse=True)[:16]:
                print(f"  {t:8.1f} us  x{count:<4d} {name[:90]}")
            gemvs = [e.device_time_total for e in prof.events() if e.name == "_gemv_kernel"]
            per_step = 4 * model.cfg.num_layers + 1  # q/k/v, o, gate/up, down per layer, then the lm_head
            roles = ["qkv", "o", "gate_up", "down"]
            split = dict.fromkeys(roles + ["lm_head"], 0.0)
            for i, t in enumerate(gemvs):
                split["lm_head" if i % per_step == per_step - 1 else roles[i % per_step % 4]] += t
            print("  gemv per step: " + ", ".join(f"{r} {t / steps:.0f} us" for r, t in split.items()))
        walls[use_pdl] = triton.testing.do_bench(step, warmup=20, rep=300, return_mode="median")
    pdl.enabled = pdl_enabled
    print(f"wall per step {1000 * walls[True]:.0f} us ({1000 / walls[True]:.1f} tok/s) with PDL, "
          f"{1000 * walls[False]:.0f} us ({1000 / walls[False]:.1f} tok/s) without; kernels {total:.0f} us")
    del cache, graphed
    torch.cuda.empty_cache()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Tuning run for decoding (needs CUDA).")
    parser.add_argument("--gemv", action="store_true", help="the dense and packed GEMV tables")
    parser.add_argument("--types", default=",".join(PACKED_TYPES), help="the packed types of --gemv")
    parser.add_argument("--select", action="store_true", help="the decode block selection at 32K and 128K")
    parser.add_argument("--only", action="store_true", help="stop before the decode step breakdown")
    args = parser.parse_args()
    with torch.inference_mode():
        if args.gemv:
            packed_table(args.types.split(","), gemv_table())
        if args.select:
            select_table()
        if args.only:
            raise SystemExit
        model = bench.random_model("llama3-8b", torch.device("cuda"), torch.bfloat16)
        for depth in (0, 32768, 131072):
            decode_breakdown(model, depth)
