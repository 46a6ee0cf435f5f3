"""The `infer` command: parses flags, drives the engine, renders. It computes nothing itself."""

import argparse
import os
import sys
from importlib.metadata import version

from infer.engine.errors import ContextOverflow, InferError, ParameterError

# The flag of each engine parameter (ParameterError.name), for error messages
FLAGS = {
    "temperature": "--temperature", "top_k": "--top-k", "top_p": "--top-p", "min_p": "--min-p",
    "repetition_penalty": "--repetition-penalty", "seed": "--seed", "max_tokens": "--max-tokens", "stop": "--stop",
    "max_context": "--max-context", "device": "--device", "dtype": "--dtype", "mode": "--sparse",
    "topk": "--sparse-topk", "block_size": "--block-size", "window_size": "--window", "dense_len": "--dense-len",
    "kernel_size": "--summary-size", "kernel_stride": "--summary-stride",
    "max_draft": "--draft-tokens", "fr_spec": "--fr-spec", "draft": "--draft", "quantize": "--quantize", "tp": "--tp",
}


class Parser(argparse.ArgumentParser):
    """argparse with its usage errors on one `infer: error:` line, as every other error."""

    def error(self, message: str):
        self.exit(2, f"infer: error: {message} (see {self.prog} --help)\n")


def error_message(e: InferError) -> str:
    """The one line shown for an engine error: its parameters named as the flags that set them."""
    if isinstance(e, ParameterError):
        flag = lambda name: FLAGS.get(name, name)
        return f"{flag(e.name)} {e.described(flag)}"
    if isinstance(e, ContextOverflow):
        if e.limit < e.model_limit:
            return f"{e}: shorten it, or raise --max-context (the model takes up to {e.model_limit})"
        return f"{e}, the model's whole context: shorten it"
    return str(e)


def add_model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a model folder (Hugging Face layout), a catalogue name (e.g. smollm2-135m-instruct) "
                                 "or a Hugging Face repo id ORG/NAME[:QUANT]")
    p.add_argument("--revision", help="branch, tag or commit of a Hugging Face repo id (default: main)")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--dtype", help="float32, bfloat16 or float16 (default: bfloat16 on cuda, float32 on cpu)")
    p.add_argument("--max-context", type=int, metavar="N",
                   help="tokens the KV cache holds (default: the model's context, lowered to what fits in memory)")
    p.add_argument("--eager", action="store_true", help="run decode steps eagerly instead of replaying CUDA graphs")
    add_tp_flag(p)
    p.add_argument("--quantize", choices=("int8", "int4"),
                   help="quantize a float model's matrices as they load (round to nearest): int8 = Q8_0 blocks "
                        "(an fp16 scale per 32 weights), int4 = Q4_1 blocks (a scale and a minimum per 32)")
    g = p.add_argument_group("block-sparse attention (defaults: the model's sparse_config, else MiniCPM4's)")
    g.add_argument("--sparse", choices=("auto", "on", "off"),
                   help="auto: dense up to --dense-len tokens, sparse past it (default); on: always sparse; off: always dense")
    g.add_argument("--sparse-topk", type=int, metavar="N",
                   help="KV blocks each query attends, sink and local window included (default 64)")
    g.add_argument("--block-size", type=int, metavar="N", help="tokens per KV block (default 64)")
    g.add_argument("--window", type=int, metavar="N", help="trailing tokens always attended (default 2048)")
    add_summary_flags(g)
    g.add_argument("--dense-len", type=int, metavar="N",
                   help="contexts up to this many tokens stay dense in auto mode (default 8192)")
    g.add_argument("--use-nope", action="store_true", default=None,
                   help="score the blocks with queries and keys before RoPE (default: the model's sparse_config)")


def add_summary_flags(g) -> None:
    """The pooled key summaries that score the sparse blocks (read by summary_overrides)."""
    g.add_argument("--summary-size", type=int, metavar="N",
                   help="keys averaged into one pooled summary, which scores the blocks it overlaps (default 16; "
                        "MiniCPM4's sparse_config: 32)")
    g.add_argument("--summary-stride", type=int, metavar="N",
                   help="tokens between summaries (default 16); 8 finds more needles among distractors at about 1.5x "
                        "the attention's decode cost at 128K (BENCHMARKS.md)")


def add_tp_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tp", type=int, default=1, metavar="N",
                   help="tensor parallelism: split the model over N processes, one a GPU on CUDA (default 1; under "
                        "torchrun, its world size)")


def add_sampling_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling (defaults: the model's generation_config.json, else greedy)")
    g.add_argument("--max-tokens", type=int, default=256, metavar="N", help="most tokens to generate (default 256)")
    g.add_argument("--temperature", type=float, metavar="T", help="0 is greedy (default 0)")
    g.add_argument("--top-k", type=int, metavar="K", help="sample among the K most likely tokens; 0 is off (default 0)")
    g.add_argument("--top-p", type=float, metavar="P",
                   help="sample among the most likely tokens that hold P of the probability, in (0, 1] (default 1)")
    g.add_argument("--min-p", type=float, metavar="P",
                   help="drop tokens less likely than P times the most likely one, in [0, 1] (default 0)")
    g.add_argument("--repetition-penalty", type=float, metavar="R",
                   help="divide the logits of tokens already seen by R (> 0; default 1: off)")
    g.add_argument("--seed", type=int, help="seed of the sampling (default: a random one)")
    g.add_argument("--stop", action="append", default=None, metavar="TEXT", help="stop the answer at TEXT (repeatable)")


def add_speculative_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("speculative decoding (the output stays the model's own: token for token when greedy)")
    g.add_argument("--draft", metavar="MODEL", help="a smaller model with the same tokenizer drafts tokens (folder or catalogue name)")
    g.add_argument("--lookup", action=argparse.BooleanOptionalAction,
                   help="draft what followed the latest earlier occurrence of the last few tokens (default: on for prompts of 1024+ tokens)")
    g.add_argument("--fr-spec", type=int, metavar="N", help="keep only the N most frequent token ids in the draft model's LM head")
    g.add_argument("--draft-tokens", type=int, metavar="K", help="most tokens drafted per step, adapted to the acceptance (1-7, default 7)")


def speculative_options(args) -> dict:
    """Engine options from add_speculative_flags; none for commands without them."""
    if not hasattr(args, "draft"):
        return {}
    from infer.engine.speculative import MAX_DRAFT
    from infer.weights.catalogue import resolve_model

    return dict(draft=resolve_model(args.draft) if args.draft else None, lookup=args.lookup, fr_spec=args.fr_spec,
                max_draft=MAX_DRAFT if args.draft_tokens is None else args.draft_tokens)


def sampling_overrides(args) -> dict:
    """The sampling flags given, checked (before any model loads)."""
    from infer.engine.sampling import check_sampling

    overrides = dict(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                     min_p=args.min_p, repetition_penalty=args.repetition_penalty, seed=args.seed, stop=args.stop)
    check_sampling(overrides)
    return overrides


def summary_overrides(args) -> dict:
    return dict(kernel_size=args.summary_size, kernel_stride=args.summary_stride)


def sparse_overrides(args) -> dict:
    return dict(mode=args.sparse, topk=args.sparse_topk, block_size=args.block_size, window_size=args.window,
                dense_len=args.dense_len, use_nope=args.use_nope, **summary_overrides(args))


def load_engine(args, sparse: dict | None = None, variants: list[dict] = ()):
    from infer.engine.generate import Engine
    from infer.weights.catalogue import resolve_model

    engine = Engine(resolve_model(args.model, args.revision), device=args.device, dtype=args.dtype,
                    max_context=args.max_context, sparse=sparse or sparse_overrides(args),
                    progress=sys.stderr.isatty(), cuda_graphs=not args.eager, quantize=args.quantize, tp=args.tp,
                    variants=variants, **speculative_options(args))
    if engine.context_note:
        print(f"infer: note: {engine.context_note} (--max-context sets it)", file=sys.stderr)
    return engine


def cmd_generate(args) -> None:
    prompt = args.prompt
    if prompt is None:
        if sys.stdin.isatty():
            raise InferError("give a prompt with -p/--prompt or on stdin")
        prompt = read_stdin()
    params = sampling_overrides(args)
    engine = load_engine(args)
    if args.raw:
        tokens = engine.tokenizer.encode(prompt)
    else:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + [{"role": "user", "content": prompt}]
        tokens = engine.tokenizer.encode_chat(messages)
    for piece in engine.generate(tokens, engine.sampling_params(**params)):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()
    print(engine.stats.line(), file=sys.stderr)


def cmd_chat(args) -> None:
    from infer.cli.chat import cmd_chat as run_chat

    run_chat(args)


def cmd_serve(args) -> None:
    from infer.cli.serve import cmd_serve as run_server

    run_server(args)


def cmd_pull(args) -> None:
    from infer.weights.catalogue import pull_model

    print(pull_model(args.name, args.revision, args.convert))


def cmd_list(args) -> None:
    from rich.console import Console
    from rich.table import Table

    from infer.weights.catalogue import models_dir
    from infer.weights.listing import cache_folder, local_models

    models, where = local_models(), f"{models_dir()} and the Hugging Face cache {cache_folder()}"
    if not models:
        print(f"no models in {where}; infer pull ORG/NAME downloads one")
        return
    table = Table(title=f"models in {where}")
    table.add_column("MODEL", no_wrap=True, min_width=max(len(m.name) for m in models))  # whole, to be copied
    for column in ("revision", "architecture", "context", "size"):
        table.add_column(column, justify="right" if column in ("context", "size") else "left")
    for m in models:
        table.add_row(m.name, m.revision, m.architecture, str(m.context or "?"), _bytes(m.size))
    Console(width=None if sys.stdout.isatty() else 1000).print(table)  # a pipe gets whole lines


def cmd_bench(args) -> None:
    import json

    from rich.console import Console
    from rich.table import Table

    from infer.engine.config import sparse_config
    from infer.engine.device import parse_device, parse_dtype
    from infer.engine.measure import bench
    from infer.engine.speculative import WIDTHS

    if args.attention or args.check:
        return cmd_bench_attention(args)
    device = parse_device(args.device)
    dtype = parse_dtype(args.dtype, device)
    path = None
    if args.model is not None:
        if args.quant is not None:
            raise InferError("--quant makes random weights at --shape; a model file runs in its own format")
        from infer.weights.catalogue import resolve_model

        path = resolve_model(args.model)
        title = f"{args.model}"
    else:
        title = f"{args.shape} (random weights{', ' + args.quant if args.quant else ''})"
    if min(args.prompt_tokens + args.depths + [args.gen_tokens]) < 0:
        raise InferError("-p, -n and -d count tokens: 0 or more (-p 0 and -n 0 skip the pp and tg rows)")
    if not any(args.prompt_tokens) and not args.gen_tokens:
        raise InferError("nothing to time: -p 0 and -n 0 leave no pp and no tg rows")
    if any(not 2 <= width <= WIDTHS[-1] for width in args.verify):
        raise InferError(f"--verify takes widths from 2 to {WIDTHS[-1]}: a pass verifies at most {WIDTHS[-1] - 1} drafts")
    sparse = dict(mode=args.sparse, **summary_overrides(args))
    sparse_config(None, **sparse)  # a bad value fails now, not after the weights are made
    plan = bench.Plan(args.shape, args.quant, path, dtype, sparse, args.prompt_tokens, args.gen_tokens,
                      args.depths, [1] + args.verify, not args.eager)
    parallel = bench.bench_group(plan, device, args.tp)
    if parallel is not None:
        device, title = parallel.device, f"{title}, tensor-parallel over {parallel.size}"
    model = plan.model(device, parallel)
    bandwidth = bench.copy_bandwidth(device)
    rows = plan.rows(model)
    if args.json:
        print(json.dumps([{**vars(r), "tok_per_s": r.tok_per_s} for r in rows]))
        return
    decode = "eager" if args.eager or device.type != "cuda" else "CUDA graphs"
    table = Table(title=f"{title}, {dtype}, {_device_name(device)}, sparse {args.sparse}, {decode}; "
                        f"copy bandwidth {bandwidth / 1e12:.2f} TB/s")
    for column in ("test", "depth", "tok/s", "ms/tok", "roofline tok/s", "% of roofline", "peak extra GB"):
        table.add_column(column, justify="right")
    for r in rows:
        roofline = bandwidth / r.bytes_per_token if r.bytes_per_token else 0.0
        table.add_row(r.test, str(r.depth), f"{r.tok_per_s:.1f}", f"{1000 / r.tok_per_s:.3f}",
                      f"{roofline:.1f}" if roofline else "", f"{100 * r.tok_per_s / roofline:.0f}%" if roofline else "",
                      f"{r.extra_bytes / 1e9:.2f}" if device.type == "cuda" else "")
    Console().print(table)


def cmd_bench_attention(args) -> None:
    """One attention layer at the Llama-3-8B shape: torch SDPA vs our block-sparse kernels vs FlexAttention."""
    import json
    from dataclasses import asdict

    from rich.console import Console
    from rich.table import Table

    from infer.engine.config import sparse_config
    from infer.engine.device import parse_device, parse_dtype
    from infer.engine.measure import bench
    from infer.engine.measure.checks import attention_checks

    if not args.attention:
        raise InferError("--check goes with --attention")
    if args.tp != 1:
        raise ParameterError("tp", "splits a model's rows; bench --attention times one attention layer on one GPU")
    s = sparse_config(None, **summary_overrides(args))
    device = parse_device(args.device)
    if device.type != "cuda":
        raise InferError("bench --attention measures the CUDA kernels: it needs a CUDA GPU")
    dtype = parse_dtype(args.dtype, device)
    checks = []
    if args.check:
        checks = attention_checks(dtype=dtype, device=device)
        if not args.json:
            for c in checks:
                print(f"{'PASS' if c.passed else 'FAIL'}  {c.name}: {c.detail}", flush=True)
        if not all(c.passed for c in checks):
            if args.json:
                print(json.dumps({"checks": [asdict(c) for c in checks], "rows": []}))
            raise InferError("attention kernel checks failed; nothing timed")
    rows = []
    for n in args.context:
        print(f"measuring one attention layer at {n} tokens ...", file=sys.stderr, flush=True)
        rows.append(bench.attention_row(n, s, chunk=args.chunk, dtype=dtype, device=device))
    if args.json:
        print(json.dumps({"checks": [asdict(c) for c in checks], "rows": [_nan_to_none(asdict(r)) for r in rows]}))
        return
    table = Table(title=f"one attention layer, Hq 32, Hkv 8, d 128, {dtype}, random q/k/v, {_device_name(device)}; "
                        f"sparse: kernel {s.kernel_size}, stride {s.kernel_stride}, block {s.block_size}, "
                        f"top-k {s.topk}, init {s.init_blocks}, window {s.window_size}; "
                        f"prefill in {args.chunk}-query chunks")
    table.add_column("")
    for r in rows:
        table.add_column(f"{r.context}", justify="right")

    def line(label, fmt):
        table.add_row(label, *(fmt(r) for r in rows))

    def ratio(a, b):
        return f"{a / b:.2f}x" if a == a and b == b else "-"  # nan-safe

    line("prefill: SDPA causal (ms)", lambda r: f"{r.prefill_sdpa_ms:.2f}")
    line("prefill: ours, selection incl. (ms)", lambda r: f"{r.prefill_ours_ms:.2f}")
    line("  of which pool+score+select (ms)", lambda r: f"{r.prefill_select_ms:.2f}")
    line("  speed-up SDPA/ours", lambda r: ratio(r.prefill_sdpa_ms, r.prefill_ours_ms))
    line("sparse part: blocks per query tile", lambda r: f"{r.mean_blocks:.1f}")
    line("sparse part: FlexAttention (ms)", lambda r: f"{r.sparse_flex_ms:.2f}" if r.sparse_flex_ms == r.sparse_flex_ms else "failed")
    line("sparse part: ours (ms)", lambda r: f"{r.sparse_ours_ms:.2f}")
    line("  speed-up flex/ours", lambda r: ratio(r.sparse_flex_ms, r.sparse_ours_ms))
    line("  flex vs ours rel. err", lambda r: f"{r.flex_rel_err:.1e}")
    line("decode: SDPA (us)", lambda r: f"{r.decode_sdpa_us:.1f}")
    line("decode: ours, selection incl. (us)", lambda r: f"{r.decode_ours_us:.1f}")
    line("  speed-up SDPA/ours", lambda r: ratio(r.decode_sdpa_us, r.decode_ours_us))
    line("decode, CUDA graph, L2 warm: SDPA (us)", lambda r: f"{r.decode_sdpa_graph_us:.1f}")
    line("decode, CUDA graph, L2 warm: ours (us)", lambda r: f"{r.decode_ours_graph_us:.1f}")
    line("  speed-up SDPA/ours", lambda r: ratio(r.decode_sdpa_graph_us, r.decode_ours_graph_us))
    line("summaries / K cache per layer (MB)", lambda r: f"{r.summary_bytes / 2**20:.1f} / {r.k_bytes / 2**20:.0f}")
    line("  summaries/K", lambda r: f"{100 * r.summary_bytes / r.k_bytes:.2f}%")
    line("prefill loop peak extra memory (MB)", lambda r: f"{r.prefill_peak_bytes / 2**20:.0f}")
    Console(width=max(100, 40 + 14 * len(rows))).print(table)


EVAL_SUITES = ("passkey", "nll", "ruler")


def cmd_eval(args) -> None:
    """Passkey retrieval, log-likelihood and RULER's tasks, block-sparse against dense attention (engine/measure/)."""
    import json
    from dataclasses import asdict

    from rich.console import Console
    from rich.table import Table

    from infer.engine.measure import eval as quality
    from infer.engine.measure import ruler
    from infer.weights.catalogue import resolve_model

    if args.sparse == "off":
        raise InferError("eval compares sparse attention against dense: --sparse off leaves nothing to compare")
    suites = args.suite
    if not suites or any(s not in EVAL_SUITES for s in suites):
        raise InferError(f"--suite {','.join(suites)}: choose from {', '.join(EVAL_SUITES)} (comma-separated)")
    if "ruler" not in suites and (args.tasks is not None or args.samples is not None):
        raise InferError("--tasks and --samples choose RULER's samples: add --suite ruler")
    model_dir = resolve_model(args.model, args.revision)
    passkey_lengths = args.lengths if "passkey" in suites else []
    nll_tokens = (max(args.lengths, default=0) if args.nll_tokens is None else args.nll_tokens) if "nll" in suites else 0
    if "passkey" in suites or "nll" in suites:
        quality.check_request(model_dir, args.max_context, passkey_lengths, args.depths, args.answer_tokens, nll_tokens)
    if "ruler" in suites:
        tasks, samples = ruler.select_tasks(args.tasks), 20 if args.samples is None else args.samples
        ruler.check_request(model_dir, args.max_context, tasks, args.lengths, samples)
    sparse = load_engine(args, {**sparse_overrides(args), "mode": args.sparse or "on"}, [{"mode": "off"}])
    dense = sparse.variants[0]  # the same model, its own KV cache
    settings, dtype = dict(vars(sparse.sparse)), str(dense.model.dtype).removeprefix("torch.")
    say = Console(stderr=True, highlight=False, markup=False).print

    def progress(r):
        say(f"passkey {r.tokens} tok, depth {r.depth:g}: dense {r.dense!r}, sparse {r.sparse!r}")

    def ruler_progress(task, length, r):
        say(f"ruler {task} {length} tok, sample {r.index}: dense {r.dense_score:.2f}, sparse {r.sparse_score:.2f}")

    rows = quality.run_passkey(dense, sparse, passkey_lengths, args.depths, args.seed, args.answer_tokens, progress)
    if nll_tokens:
        say(f"log-likelihood over {nll_tokens} tokens ...")
    nll = quality.run_nll(dense, sparse, nll_tokens, args.nll_text) if nll_tokens else None
    ruler_rows = ruler.run_ruler(dense, sparse, tasks, args.lengths, samples, args.seed,
                                 ruler_progress) if "ruler" in suites else []
    if args.json:
        out = {"model": str(model_dir), "device": _device_name(dense.device), "dtype": dtype, "sparse": settings,
               "seed": args.seed}
        if "passkey" in suites:
            out["passkey"] = [asdict(r) for r in rows]
        if "nll" in suites:
            out["nll"] = _nan_to_none({**asdict(nll), "diff_all": nll.diff_all, "diff_long": nll.diff_long,
                                       "diff_causal": nll.diff_causal}) if nll else None
        if "ruler" in suites:
            out["ruler"] = [_nan_to_none(asdict(r)) for r in ruler_rows]
        print(json.dumps(out))
        return
    console = Console(width=max(130, Console().width), highlight=False)
    console.print(f"{model_dir.name} on {_device_name(dense.device)}, {dtype}; dense: sparse mode off; sparse: "
                  + ", ".join(f"{k} {v}" for k, v in settings.items()), markup=False, soft_wrap=True)
    if rows:
        table = Table(title=f"passkey retrieval (seed {args.seed}): greedy answers, dense vs sparse")
        for column in ("tokens", "depth", "needle at", "key", "dense answer", "sparse answer", "dense ok", "sparse ok",
                       "equal", "KV read"):
            table.add_column(column, justify="left" if "answer" in column else "right", min_width=len(column))
        mark = lambda ok: "yes" if ok else "NO"
        shown = lambda text: repr(text)[1:-1]  # newlines and the like escaped: one line per row
        for r in rows:
            read = f"{100 * r.kv_read:.0f}%" if r.sparse_attention == "sparse" else "dense"
            table.add_row(str(r.tokens), f"{r.depth:g}", str(r.needle_at), r.key, shown(r.dense), shown(r.sparse),
                          mark(r.dense_correct), mark(r.sparse_correct), mark(r.equal), read)
        console.print(table)
        count = lambda key: f"{sum(getattr(r, key) for r in rows)}/{len(rows)}"
        console.print(f"dense correct {count('dense_correct')}, sparse correct {count('sparse_correct')}, "
                      f"equal answers {count('equal')}", markup=False)
    if nll:
        console.print(f"text: {nll.source}", markup=False, soft_wrap=True)
        table = Table(title=f"mean NLL per token (nats) over the first {nll.tokens} tokens of the text")
        for column in ("predictions", "count", "dense", "sparse", "sparse - dense", "top-1 agree", "sparse KV read"):
            table.add_column(column, justify="right")
        table.add_row("all", str(nll.tokens - 1), f"{nll.dense_all:.4f}", f"{nll.sparse_all:.4f}",
                      f"{nll.diff_all:+.4f}", "", "")
        if nll.long_predictions:
            read = f"{100 * nll.kv_read_long:.0f}%" if nll.kv_read_long == nll.kv_read_long else "dense"
            table.add_row(f"at positions >= {nll.boundary}", str(nll.long_predictions), f"{nll.dense_long:.4f}",
                          f"{nll.sparse_long:.4f}", f"{nll.diff_long:+.4f}", f"{100 * nll.top1_agree_long:.1f}%", read)
        if nll.causal_long:
            table.add_row("  of which tile ends (causal)", str(nll.causal_long), f"{nll.dense_causal:.4f}",
                          f"{nll.sparse_causal:.4f}", f"{nll.diff_causal:+.4f}", "", "")
        console.print(table)
        console.print("Sparse prefill shares one block selection per query tile, so a prediction's selection may "
                      "see up to block_size - 1 later tokens; the tile-end row holds only strictly causal ones.",
                      markup=False, soft_wrap=True)
    if ruler_rows:
        console.print(_ruler_table(ruler_rows, args.seed))


def _ruler_table(rows, seed: int):
    """RULER's scores per task and length, and their mean over the tasks at each length."""
    from rich.table import Table

    table = Table(title=f"RULER tasks (seed {seed}): greedy answers scored as RULER scores them, dense vs sparse")
    for column in ("task", "tokens", "samples", "dense", "sparse", "sparse/dense", "95% interval", "KV read"):
        table.add_column(column, justify="left" if column == "task" else "right")
    percent = lambda x: "-" if x != x else f"{100 * x:.1f}%"
    for r in rows:
        read = "dense" if r.kv_read != r.kv_read else f"{100 * r.kv_read:.0f}%"
        interval = "-" if r.ratio_low != r.ratio_low else f"{percent(r.ratio_low)} to {percent(r.ratio_high)}"
        table.add_row(r.task, str(r.length), str(len(r.samples)), percent(r.dense), percent(r.sparse), percent(r.ratio),
                      interval, read)
    for length in dict.fromkeys(r.length for r in rows):
        at = [r for r in rows if r.length == length]
        dense, sparse = (sum(getattr(r, key) for r in at) / len(at) for key in ("dense", "sparse"))
        table.add_row(f"mean of {len(at)} tasks", str(length), "", percent(dense), percent(sparse),
                      percent(sparse / dense if dense else float("nan")), "", "", style="bold")
    table.caption = ("score: the share of the expected answers in the answer (qa: any of them); 95% interval: "
                     "percentile bootstrap of the ratio over the samples, resampled in pairs")
    return table


def _device_name(device) -> str:
    import torch

    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def _nan_to_none(d: dict) -> dict:
    return {k: None if v != v else v for k, v in d.items()}  # strict JSON has no NaN


def _bytes(n: float) -> str:
    units = ("B", "kB", "MB", "GB", "TB")
    i = 0
    while n >= 1000 and i + 1 < len(units):
        n, i = n / 1000, i + 1
    return f"{n:.0f} {units[i]}" if i < 2 else f"{n:.1f} {units[i]}"


def _int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def _name_list(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _float_list(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def read_stdin() -> str:
    data = sys.stdin.buffer.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        print("infer: warning: the input is not valid UTF-8; invalid bytes were replaced", file=sys.stderr)
        return data.decode("utf-8", errors="replace")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="infer", description="Long-context LLM inference: block-sparse attention, speculative decoding.")
    parser.add_argument("--version", action="version", version=f"infer {version('infer')}")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="answer one prompt, streaming the text to stdout and stats to stderr")
    add_model_flags(gen)
    gen.add_argument("-p", "--prompt", help="the prompt (default: read stdin)")
    gen.add_argument("--system", help="system message (chat mode)")
    mode = gen.add_mutually_exclusive_group()
    mode.add_argument("--chat", dest="raw", action="store_false", help="wrap the prompt in the model's chat template (default)")
    mode.add_argument("--raw", dest="raw", action="store_true", help="feed the prompt as plain text")
    add_sampling_flags(gen)
    add_speculative_flags(gen)
    gen.set_defaults(func=cmd_generate, raw=False)

    chat = sub.add_parser("chat", help="chat in the terminal; pipe a document in (or -f FILE) to ask about it")
    add_model_flags(chat)
    chat.add_argument("-p", "--prompt", help="ask this about the document once, print the answer and exit")
    chat.add_argument("-f", "--file", action="append", help="a document to talk about (repeatable; instead of stdin)")
    chat.add_argument("--system", help="system message")
    chat.add_argument("--stats-json", metavar="FILE", help="append one JSON object of stats per turn to FILE")
    add_sampling_flags(chat)
    add_speculative_flags(chat)
    chat.set_defaults(func=cmd_chat)

    serve = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (/v1/chat/completions, /v1/completions)")
    add_model_flags(serve)
    serve.add_argument("--host", default="127.0.0.1",
                       help="address to listen on (default 127.0.0.1, this machine only; 0.0.0.0 for every interface)")
    serve.add_argument("--port", type=int, default=8080, help="port to listen on (default 8080)")
    serve.add_argument("--api-key", help="answer only requests with 'Authorization: Bearer KEY' (default: $INFER_API_KEY)")
    serve.add_argument("--queue", type=int, default=8,
                       help="requests that may wait while one runs; more are answered 429 (default 8)")
    add_speculative_flags(serve)
    serve.set_defaults(func=cmd_serve)

    bench = sub.add_parser("bench", help="prefill/decode throughput on random weights at a real model shape, or of a "
                                         "model file")
    bench.add_argument("model", nargs="?", help="a model (folder, .gguf file, catalogue name) instead of --shape")
    bench.add_argument("--shape", default="llama3-8b", help="named shape: llama3-8b, llama3-70b, qwen2.5-7b, minicpm4-8b, smollm2-135m")
    bench.add_argument("--quant", choices=("q4_k_m", "q8_0", "int4", "int8"),
                       help="random weights in these GGML types (q4_k_m: as llama-quantize's Q4_K_M; int4/int8: as "
                            "--quantize makes them) instead of --dtype")
    bench.add_argument("-p", "--prompt-tokens", type=_int_list, default=[512], help="prefill lengths, comma-separated (0: no pp rows)")
    bench.add_argument("-n", "--gen-tokens", type=int, default=128, help="tokens decoded per tg row (0: no tg rows)")
    bench.add_argument("-d", "--depths", type=_int_list, default=[0], help="cached tokens before decoding, comma-separated")
    bench.add_argument("--sparse", choices=("auto", "on", "off"), default="auto",
                       help="block-sparse attention as in the engine (default auto: sparse past 8192 tokens)")
    add_summary_flags(bench)
    bench.add_argument("--verify", type=_int_list, default=[], metavar="WIDTHS",
                       help="also time verification passes of these many tokens (k drafts + 1), comma-separated: vN rows count passes")
    bench.add_argument("--eager", action="store_true", help="decode eagerly instead of replaying CUDA graphs")
    add_tp_flag(bench)
    bench.add_argument("--device")
    bench.add_argument("--dtype")
    bench.add_argument("--json", action="store_true", help="print the rows as JSON")
    bench.add_argument("--attention", action="store_true",
                       help="one attention layer (Llama-3-8B shape, CUDA): SDPA vs our block-sparse kernels vs FlexAttention")
    bench.add_argument("--context", type=_int_list, default=[32768, 131072],
                       help="--attention: context lengths, comma-separated (multiples of 64)")
    bench.add_argument("--chunk", type=int, default=16384, help="--attention: queries per prefill chunk (default 16384)")
    bench.add_argument("--check", action="store_true",
                       help="--attention: first check each kernel against its torch reference; exit non-zero on failure")
    bench.set_defaults(func=cmd_bench)

    ev = sub.add_parser("eval", help="quality of block-sparse attention against dense: passkey, log-likelihood, RULER",
                        description="Runs the model twice, dense (sparse mode off) and block-sparse (the sparse flags; "
                                    "mode 'on' unless --sparse auto), and compares greedy passkey answers, per-token "
                                    "log-likelihoods and RULER's long-context tasks.")
    add_model_flags(ev)
    ev.add_argument("--suite", type=_name_list, default=["passkey", "nll"],
                    help="what to run, comma-separated: passkey, nll, ruler (default passkey,nll)")
    ev.add_argument("--lengths", type=_int_list, default=[8192, 16384, 32000],
                    help="prompt lengths in tokens, comma-separated (default 8192,16384,32000): a passkey prompt plus "
                         "--answer-tokens, and a RULER sample with its answer, must fit the context; empty skips the "
                         "passkey test")
    ev.add_argument("--depths", type=_float_list, default=[0.1, 0.5, 0.9],
                    help="needle depths as fractions of the document, comma-separated (default 0.1,0.5,0.9)")
    ev.add_argument("--seed", type=int, default=0, help="seed of the filler text, the keys and the RULER samples (default 0)")
    ev.add_argument("--answer-tokens", type=int, default=12, help="greedy tokens per passkey answer (default 12)")
    ev.add_argument("--nll-tokens", type=int,
                    help="tokens of natural text scored for log-likelihood (default: the largest length; 0 skips)")
    ev.add_argument("--nll-text", metavar="FILE", help="the text to score (default: /usr/share/common-licenses)")
    ev.add_argument("--tasks", type=_name_list,
                    help="RULER tasks or families, comma-separated: niah_single_1..3, niah_multikey_1..3, "
                         "niah_multivalue, niah_multiquery, vt, cwe, fwe, qa; niah_single, niah_multikey or niah "
                         "name a family (default: all)")
    ev.add_argument("--samples", type=int, help="RULER samples per task and length (default 20)")
    ev.add_argument("--json", action="store_true", help="print the results as JSON")
    ev.set_defaults(func=cmd_eval)

    pull = sub.add_parser("pull", help="download a model without running it: a catalogue name (converted into the "
                                       "models folder) or a Hugging Face repo id ORG/NAME[:QUANT] (into its cache)")
    pull.add_argument("name")
    pull.add_argument("--revision", help="branch, tag or commit of a Hugging Face repo id (default: main)")
    pull.add_argument("--convert", action="store_true",
                      help="a catalogue model: also convert its GGUF into a bf16 Hugging Face folder (it runs as the "
                           "GGUF it is without this)")
    pull.set_defaults(func=cmd_pull)

    ls = sub.add_parser("list", help="the models on this machine: the models folder and the Hugging Face cache")
    ls.set_defaults(func=cmd_list)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except InferError as e:
        print(f"infer: error: {error_message(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninfer: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except MemoryError:
        print("infer: error: out of memory; try a smaller --max-context", file=sys.stderr)
        return 1
    except Exception as e:
        from infer.engine.parallel import lost_rank

        if lost := lost_rank():  # a collective failed because a tensor-parallel rank has gone
            print(f"infer: error: {lost}", file=sys.stderr)
            return 1
        if is_out_of_memory(e):
            print("infer: error: out of memory; try a smaller --max-context or a smaller model", file=sys.stderr)
            return 1
        if os.environ.get("INFER_DEBUG"):
            raise
        print(f"infer: error: internal error ({internal_error(e)}); INFER_DEBUG=1 shows where", file=sys.stderr)
        return 1
    return 0


def is_out_of_memory(e: Exception) -> bool:
    """torch's GPU out-of-memory error, or its CPU allocator's."""
    import torch

    return isinstance(e, torch.OutOfMemoryError) or (isinstance(e, RuntimeError) and "can't allocate memory" in str(e))


def internal_error(e: Exception) -> str:
    """An unexpected exception as one line: its type and the first line of its message."""
    lines = str(e).strip().splitlines()
    return type(e).__name__ + (f": {lines[0]}" if lines else "")


if __name__ == "__main__":
    sys.exit(main())
