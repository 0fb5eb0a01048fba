"""End to end: generated tokens/s, request latency and peak device memory on the same engine for
  a. dense, cache none, the linear schedule with one token per step (LLaDA's reference generate());
  b. dense, prefix cache, threshold 0.9 (the Fast-dLLM recipe);
  c. 2-bit packed, prefix cache, threshold 0.9;
  d. 2-bit packed, dual cache, threshold 0.9.

    python benchmarks/e2e.py --shape llada-8b                 # a GPU: random weights in LLaDA-8B's shapes
    python benchmarks/e2e.py --model assets/llada-shakespeare --artifact build/shakespeare-2bit   # a CPU

With random weights (--shape) no token reaches a confidence threshold, and timing does not depend on the
weight values, so b-d commit a synthetic `--tokens-per-step` K instead: the linear schedule with
steps = gen / K. With real weights (--model/--artifact) they use the threshold itself. Tokens/s counts
generated tokens only (never the prompt) over the wall time of the whole batch. Peak memory is torch's
allocated peak (tensors alive) and its reserved peak (what the process held from the device, with the
allocator's cache and the CUDA graphs' pool), both without the CUDA context. The record also holds a
what-fits-where table: weight and KV bytes, and a bandwidth-bound decode estimate per device.
Writes JSON and a PNG to benchmarks/results/.
"""
from __future__ import annotations

import dataclasses
import statistics
import time
from pathlib import Path

import torch
from tqdm import tqdm

from common import (check_output, confidence, description, environment, listed, random_weight, run_main,
                    write_results)
from shakespeare import speeches, test_plays
from qdllm.engine import Detokenizer, DiffusionLM, EngineCore, ModelConfig, SamplingParams, load_model, load_tokenizer
from qdllm.engine.artifact import read_manifest
from qdllm.engine.errors import ArgumentParser, bounded
from qdllm.engine.loader import BACKENDS, check_dir, read_config, resolve_device
from qdllm.engine.quant_linear import QuantLinear
from qdllm.engine.sequence import block_layout
from qdllm.engine.tokenizer import chat_prompt, end_token_ids
from qdllm.kernels.dispatch import triton_unusable

SHAPES = {  # LLaDA-8B's config.json (FACTS.md), and a small one to try the script on a CPU
    "llada-8b": dict(vocab_size=126464, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=32, mlp_hidden=12288,
                     rope_theta=500000.0, norm_eps=1e-5, mask_token_id=126336, eos_token_ids=(126081,),
                     max_seq_len=4096),
    "llada-small": dict(vocab_size=4096, d_model=512, n_layers=4, n_heads=8, n_kv_heads=8, mlp_hidden=1536,
                        rope_theta=500000.0, norm_eps=1e-5, mask_token_id=3, eos_token_ids=(2,), max_seq_len=1024),
}
# Memory bandwidth (FACTS.md) and memory of the devices in the what-fits-where table.
# The 8 and 16 GB cards' bandwidths are NVIDIA's specifications for the RTX 4060 and RTX 4080.
DEVICES = {"RTX 4090 (24 GB)": (1.0e12, 24), "RTX 4080 (16 GB)": (0.717e12, 16), "RTX 4060 (8 GB)": (0.272e12, 8),
           "Jetson AGX Orin (64 GB)": (204.8e9, 64), "Jetson Orin Nano 8GB": (102e9, 8),
           "H100 SXM (80 GB, copy-measured 3.0 TB/s)": (3.0e12, 80)}
CONFIGS = {"a": ("dense", "none", False), "b": ("dense", "prefix", True), "c": ("2bit", "prefix", True),
           "d": ("2bit", "dual", True)}


def random_model(cfg: ModelConfig, packed: bool, device: torch.device, dtype: torch.dtype, backend: str,
                 block_size: int = 128) -> DiffusionLM:
    """Random weights; with `packed`, every decoder linear is a random 2-bit BCQ weight (never dense on the
    device, so the peak memory is the packed model's). `backend` picks the kernels, as `load_model`'s does."""
    with torch.device("meta"):
        model = DiffusionLM(cfg)
    if packed:
        for i, layer in enumerate(model.layers):
            for j, name in enumerate(("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")):
                lin = getattr(layer, name)
                w = random_weight(lin.out_features, lin.in_features, block_size, 1000 * i + j, device)
                setattr(layer, name, QuantLinear(w, backend))
    model = model.to_empty(device=device).to(dtype)
    model.backend = backend
    gen = torch.Generator(device).manual_seed(0)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.data.fill_(1.0)
        else:
            p.data.normal_(0, 0.02, generator=gen)
    return model.eval().requires_grad_(False)


def run(core: EngineCore, prompts: list[list[int]], params: SamplingParams) -> dict:
    """One batch through an engine that has run it before, so its pool (and its CUDA graphs) are in place."""
    ids = [core.add_request(p, params) for p in prompts]
    cuda = core.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    final = {}
    while core.has_unfinished():
        final.update((o.request_id, o) for o in core.step() if o.finished)
    if cuda:
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    outs = [final[i] for i in ids]
    return {"wall_s": wall, "tokens": sum(len(o.token_ids) for o in outs),
            "latency_s": statistics.median(o.stats.latency_s for o in outs),
            "nfe": statistics.mean(o.nfe for o in outs)}


def profile_run(core: EngineCore, prompts: list[list[int]], params: SamplingParams, top: int = 12) -> dict:
    """One more run under torch.profiler, per engine step: the wall time; the device's busy time (its kernels' and
    copies' summed time) and its kernels and copies, those of CUDA graph replays included; the kernel and graph
    launches, host waits and copies the host issued; and the kernels that took the most time; aten ops count
    nested ones too. Where busy time is far below wall time, the host bounds the step. The profiler's own
    overhead makes these walls longer than the timed runs'."""
    from torch.profiler import ProfilerActivity, profile

    cuda = core.device.type == "cuda"
    steps = core.stats.steps
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        wall = run(core, prompts, params)["wall_s"]
    steps = core.stats.steps - steps
    events = prof.key_averages()
    on_device = [e for e in events if e.device_type != torch.autograd.DeviceType.CPU]

    def per_step(prefixes: tuple[str, ...]) -> float:
        return sum(e.count for e in events if e.key.startswith(prefixes)) / steps

    kernels = sorted(on_device, key=lambda e: e.self_device_time_total, reverse=True)[:top]
    return {"steps": steps, "wall_ms_per_step": 1e3 * wall / steps,
            "device_busy_ms_per_step": sum(e.self_device_time_total for e in on_device) / 1e3 / steps,
            "device_ops_per_step": sum(e.count for e in on_device) / steps,
            "kernel_launches_per_step": per_step(("cudaLaunchKernel", "cuLaunchKernel")),
            "graph_launches_per_step": per_step(("cudaGraphLaunch",)),
            "host_waits_per_step": per_step(("cudaStreamSynchronize", "cudaDeviceSynchronize",
                                             "cudaEventSynchronize")),
            "copies_per_step": per_step(("cudaMemcpy",)),
            "cpu_ops_per_step": per_step(("aten::",)),
            "top_kernels": [{"name": e.key[:100], "calls_per_step": e.count / steps,
                             "us_per_step": e.self_device_time_total / steps} for e in kernels]}


def effective_bits(weights: list) -> float:
    """Stored bits per weight over packed linears, scales included."""
    return sum(w.effective_bits * w.out_features * w.in_features for w in weights) / sum(
        w.out_features * w.in_features for w in weights)


def random_bits(cfg: ModelConfig, block_size: int = 128) -> float:
    """Effective bits of one decoder layer of random packed weights (all layers are alike), built on the CPU."""
    shapes = [(cfg.d_model, cfg.d_model)] * 4 + [(cfg.mlp_hidden, cfg.d_model)] * 2 + [(cfg.d_model, cfg.mlp_hidden)]
    return effective_bits([random_weight(n, k, block_size, i, torch.device("cpu")) for i, (n, k) in enumerate(shapes)])


def fits_table(cfg: ModelConfig, b_eff: float, prompt: int, gen: int) -> list[dict]:
    """Weight and KV bytes at batch 1, and the bandwidth bound on forwards/s: each forward reads every weight
    and the sequence's KV once (threshold decoding multiplies tokens/s by the tokens committed per forward)."""
    linears = cfg.n_layers * (4 * cfg.d_model * cfg.d_model + 3 * cfg.d_model * cfg.mlp_hidden)
    table = cfg.vocab_size * cfg.d_model * 2  # the fp16 embedding, and the LM head as large again
    kv = 2 * cfg.n_layers * (prompt + gen) * cfg.n_kv_heads * (cfg.d_model // cfg.n_heads) * 2
    rows = []
    for name, (bandwidth, gb) in DEVICES.items():
        for kind, lin in (("fp16", linears * 2), ("2bit", linears * b_eff / 8)):
            stored = lin + 2 * table
            read = lin + table + kv  # a forward reads a few embedding rows, the whole LM head and the KV
            rows.append({"device": name, "memory_gb": gb, "weights": kind, "weight_gb": stored / 1e9,
                         "kv_gb_per_sequence": kv / 1e9, "fits_batch_1": (stored + kv) / 1e9 < gb * 0.9,
                         "forwards_per_s_bound": bandwidth / read})
    return rows


def speedups(results: list[dict]) -> None:
    """Each row's median tokens/s over a's and b's at its batch; None until those have run."""
    for r in results:
        for key in "ab":
            base = next((x for x in results if x["config"] == key and x["batch"] == r["batch"]), None)
            r[f"speedup_vs_{key}"] = base and r["tokens_per_s"]["median"] / base["tokens_per_s"]["median"]


def ratio(x: float | None) -> str:
    return "-" if x is None else f"x{x:.2f}"


def plot(file: Path, record: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = record["results"]
    batches = sorted({r["batch"] for r in rows})
    fig, ax = plt.subplots(figsize=(8, 4.5))
    width = 0.8 / len(CONFIGS)
    for i, key in enumerate(CONFIGS):
        mine = [r for r in rows if r["config"] == key]
        if not mine:  # a run stopped before this config
            continue
        med = [next((r["tokens_per_s"]["median"] for r in mine if r["batch"] == b), 0.0) for b in batches]
        label = mine[0]["label"]
        ax.bar([x + i * width for x in range(len(batches))], med, width, label=label)
    ax.set_xticks([x + width * (len(CONFIGS) - 1) / 2 for x in range(len(batches))], [f"batch {b}" for b in batches])
    ax.set_ylabel("generated tokens/s (median)")
    env, s = record["environment"], record["settings"]
    graphs = ", CUDA graphs" if s["cuda_graphs"] else ""
    run = f"{s['dense_dtype'].removeprefix('torch.')}, backend {s['backend']}{graphs}"
    ax.set_title(f"qdllm end to end, {s['model']}, gen {s['gen']}, block {s['block']}, {run}\n"
                 f"{env['device']}, {env['date']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(file, dpi=120)


def main() -> None:
    ap = ArgumentParser(description=description(__doc__))
    ap.add_argument("--shape", choices=SHAPES, default=None, help="random weights of this shape")
    ap.add_argument("--model", default=None, help="a dense checkpoint (with --artifact: its 2-bit artifact)")
    ap.add_argument("--artifact", default=None)
    ap.add_argument("--gen", type=bounded(int, "--gen", 1), default=256)
    ap.add_argument("--block", type=bounded(int, "--block", 1), default=32)
    ap.add_argument("--prompt-len", type=bounded(int, "--prompt-len", 1), default=64, help="prompt tokens with --shape")
    ap.add_argument("--batch", type=listed(bounded(int, "--batch", 1), "--batch"), default="1,4,16")
    ap.add_argument("--threshold", type=confidence("--threshold"), default=0.9)
    ap.add_argument("--tokens-per-step", type=bounded(int, "--tokens-per-step", 1), default=4,
                    help="synthetic commits per step with --shape")
    ap.add_argument("--repeats", type=bounded(int, "--repeats", 1), default=3)
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default=None,
                    help="dense dtype (default float16 on GPU, float32 on CPU)")
    ap.add_argument("--backend", choices=BACKENDS, default="auto",
                    help="kernels of every model's elementwise steps and of the 2-bit linears; \"dense\" "
                         "dequantizes the 2-bit linears once at load")
    ap.add_argument("--cuda-graphs", action="store_true", help="the engine replays forwards from CUDA graphs")
    ap.add_argument("--configs", default="abcd", help="which of a-d to run")
    ap.add_argument("--fits-only", action="store_true", help="with --shape: print the what-fits-where table only")
    ap.add_argument("--profile", action="store_true",
                    help="after the timed runs, one more under torch.profiler: where each engine step's time goes")
    ap.add_argument("--out", default="benchmarks/results/e2e")
    args = ap.parse_args()
    if (args.shape is None) == (args.model is None) or (args.model is not None) != (args.artifact is not None):
        ap.error("give --shape, or --model with --artifact")
    if args.fits_only and not args.shape:
        ap.error("--fits-only needs --shape")

    if args.shape and args.backend == "dense":
        ap.error("--backend dense: the random packed weights of --shape would only time a dense model")
    device = resolve_device(args.device, "--device")  # a ValueError is one line, through run_main
    if args.cuda_graphs and device.type != "cuda":
        ap.error(f"--cuda-graphs needs a CUDA device; the device is {device}")
    if not args.configs or set(args.configs) - set(CONFIGS):
        ap.error(f"--configs: expected letters from abcd, got {args.configs!r}")
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.float16 if device.type == "cuda" else torch.float32)
    if args.backend == "triton" and (why := triton_unusable(torch.empty(0, device=device, dtype=dtype))):
        ap.error(f"--backend triton cannot run here: {why}")
    batches = args.batch
    block, n_blocks = block_layout(SamplingParams(max_tokens=args.gen, block_length=args.block))
    if args.shape and set(args.configs) - {"a"} and args.gen // args.tokens_per_step < n_blocks:
        ap.error(f"--tokens-per-step {args.tokens_per_step}: --gen {args.gen} in {n_blocks} block(s) of --block "
                 f"{block} takes at most {args.gen // n_blocks} tokens per step (each block needs a step)")
    if args.shape:
        cfg = ModelConfig(family="llada", **SHAPES[args.shape])
        detok = Detokenizer(None, frozenset())
        gen = torch.Generator().manual_seed(0)
        prompt_pool = [torch.randint(0, cfg.mask_token_id, (args.prompt_len,), generator=gen).tolist()
                       for _ in range(max(batches))]
        build = {"dense": lambda: random_model(cfg, False, device, dtype, args.backend),
                 "2bit": lambda: random_model(cfg, True, device, dtype, args.backend)}
        b_eff = random_bits(cfg)
    else:  # every file is read and checked here, before any model loads
        check_dir(Path(args.model), "a Hugging Face checkpoint directory")
        check_dir(Path(args.artifact), "a qdllm artifact directory")
        cfg = read_config(args.model)
        b_eff = read_manifest(Path(args.artifact), verify=False)["effective_bits"]  # as stored, whatever the backend
        data = test_plays(args.model)
        tok = load_tokenizer(args.model)
        build = {"dense": lambda: load_model(args.model, device=device, dtype=dtype, backend=args.backend),
                 "2bit": lambda: load_model(args.artifact, device=device, dtype=dtype, backend=args.backend)}
        detok = Detokenizer(tok, end_token_ids(tok, cfg.eos_token_ids))
        try:
            texts = speeches(data, max(batches))
        except ValueError as e:
            ap.error(f"--batch {max(batches)}: {e}")
        prompt_pool = [chat_prompt(tok, [{"role": "user", "content": s}]) for s in texts]
    prompt_len = args.prompt_len if args.shape else max(len(p) for p in prompt_pool)
    if prompt_len + block * n_blocks > cfg.max_seq_len:
        prompts = f"--prompt-len {prompt_len}" if args.shape else f"the longest prompt ({prompt_len} tokens)"
        ap.error(f"{prompts} plus --gen {args.gen} in whole blocks of --block {block} ({block * n_blocks} tokens) "
                 f"exceeds the model's context of {cfg.max_seq_len} tokens")

    if args.fits_only:
        table = fits_table(cfg, b_eff, args.prompt_len, args.gen)
        print(f"{args.shape}: {b_eff:.3f} effective bits; prompt {args.prompt_len} + gen {args.gen} tokens")
        for r in table:
            print(f"{r['device']:>40} {r['weights']:>5}: weights {r['weight_gb']:6.2f} GB"
                  f" + KV {r['kv_gb_per_sequence']:.2f}"
                  f" GB, fits: {'yes' if r['fits_batch_1'] else 'no'}, <= {r['forwards_per_s_bound']:.1f} forwards/s")
        return

    def params(cache: str, fast: bool) -> SamplingParams:
        common = dict(max_tokens=args.gen, block_length=args.block, ignore_eos=True)
        if not fast:
            return SamplingParams(steps=args.gen, **common)
        if args.shape:  # synthetic: K tokens per step, the linear schedule
            return SamplingParams(steps=args.gen // args.tokens_per_step, cache=cache, **common)
        return SamplingParams(threshold=args.threshold, cache=cache, **common)

    settings = {"model": args.shape or args.model, "artifact": args.artifact, "gen": args.gen, "block": args.block,
                "batches": batches, "threshold": args.threshold,
                "tokens_per_step": args.tokens_per_step if args.shape else None, "repeats": args.repeats,
                "dense_dtype": str(dtype), "backend": args.backend, "cuda_graphs": args.cuda_graphs,
                "profile": args.profile,
                "prompt_tokens": prompt_len,
                "weights": "random" if args.shape else "trained", "effective_bits": b_eff}
    out = Path(f"{args.out}-{args.shape or Path(args.model).name}-{device.type}{'-graphs' if args.cuda_graphs else ''}")
    check_output("--out", out, inputs=[Path(p) for p in (args.model, args.artifact) if p])
    labels = {"a": "a: dense, no cache (LLaDA)", "b": "b: dense, prefix + thr (Fast-dLLM)",
              "c": "c: 2-bit, prefix + thr", "d": "d: 2-bit, dual + thr"}
    env = environment(device)
    results = []
    configs = [key for key in CONFIGS if key in args.configs]
    settings["configs"] = "".join(configs)
    bar = tqdm(total=len(configs) * len(batches), desc="e2e benchmark", unit="config")
    # 2-bit first, so its peak memory is measured with no dense model ever allocated; the slow reference (a)
    # last, so a run stopped at a time limit keeps the rest (the record is rewritten after every config).
    for weights, order in (("2bit", "cd"), ("dense", "ba")):
        keys = [key for key in order if key in configs]
        if not keys:
            continue
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        model = build[weights]()
        for key in keys:
            _, cache, fast = CONFIGS[key]
            for batch in batches:
                prompts = prompt_pool[:batch]
                sp = params(cache, fast)
                core = EngineCore(model, detok, max_num_seqs=batch, max_batch_tokens=1 << 30,
                                  cuda_graphs=args.cuda_graphs)
                run(core, prompts, sp)  # warm-up: kernel autotuning, allocator, KV pool, graph captures
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                runs = [run(core, prompts, sp) for _ in range(args.repeats)]
                rates = sorted(r["tokens"] / r["wall_s"] for r in runs)
                results.append({
                    "config": key, "label": labels[key], "weights": weights, "cache": cache, "batch": batch,
                    "sampling": dataclasses.asdict(sp),
                    "tokens_per_s": {"min": rates[0], "median": statistics.median(rates), "max": rates[-1]},
                    "latency_s": sorted(r["latency_s"] for r in runs), "nfe_per_request": runs[0]["nfe"],
                    "peak_memory_gb": torch.cuda.max_memory_allocated() / 1e9 if device.type == "cuda" else None,
                    # what the process held from the device: the cached blocks and the graphs' memory pool too
                    "peak_reserved_gb": torch.cuda.max_memory_reserved() / 1e9 if device.type == "cuda" else None,
                    "kv_pool_gb": core.pool.nbytes / 1e9,
                    "profile": profile_run(core, prompts, sp) if args.profile else None})
                speedups(results)
                record = {"benchmark": "e2e", "environment": env, "settings": settings,
                          "complete": len(results) == len(configs) * len(batches), "results": results,
                          "fits": fits_table(cfg, b_eff, prompt_len, args.gen)}
                write_results(out, record, plot)
                bar.update()
                del core  # its pool, graphs and model go before the next engine is built
        del model
    bar.close()
    for r in results:
        mem = "" if r["peak_memory_gb"] is None else (f", peak {r['peak_memory_gb']:.2f} GB allocated, "
                                                      f"{r['peak_reserved_gb']:.2f} GB reserved")
        print(f"{r['label']:>36} batch {r['batch']:>2}: {r['tokens_per_s']['median']:8.1f} tok/s "
              f"({ratio(r['speedup_vs_a'])} vs a, {ratio(r['speedup_vs_b'])} vs b), "
              f"nfe {r['nfe_per_request']:.0f}{mem}")
        if r["profile"]:
            pr = r["profile"]
            print(f"{'':>36} per step: {pr['wall_ms_per_step']:.2f} ms wall, {pr['device_busy_ms_per_step']:.2f} ms "
                  f"device busy, {pr['kernel_launches_per_step']:.0f} kernel and {pr['graph_launches_per_step']:.0f} "
                  f"graph launches, {pr['host_waits_per_step']:.1f} host waits, {pr['cpu_ops_per_step']:.0f} aten ops")


if __name__ == "__main__":
    run_main(main)
