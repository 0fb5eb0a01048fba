"""Kernels: the BCQ kernels against torch's bf16 matmul on dense weights, for LLaDA-8B and Dream-7B linears.

    python benchmarks/kernels.py [--models llada,dream] [--ms 1,8,16,32,64,128,256,512,1024] [--repeats 5]

Needs a CUDA GPU. Weights are random packed weights with ABMP's mix (5% of blocks order 1, 5% order 3,
the rest order 2: exactly 2 planes on average) and bf16 activations. Every path is timed three ways, each
repeated, and the record keeps min/median/max over the repeats:
- `time_ms`: the median of triton.testing.do_bench, eager, as an engine without CUDA graphs sees a call.
  A call's time there is its GPU time or the host's time to launch it, whichever is longer;
- `gpu_time_ms`: the GPU time alone: 64 calls captured in one CUDA graph and replayed, cycling through
  copies of the weight that together exceed any GPU's L2, so every call reads its weight from memory, as
  each layer of a forward does;
- `host_ms`: the host's time to launch one call (Python, the dispatcher, Triton's launcher, torch's
  allocations), from back-to-back calls that do not wait for the GPU.
Speedups over torch are given for the eager and the GPU times; the ideal speedup is
min(16/b_eff, max(1, R/M)) with R = measured bf16 FLOP/s over measured copy bandwidth (above R/M < 1 a
dense fallback still gives 1). GB/s counts the bytes a call must move (the packed weight, dense bf16 for
torch, plus x and y) over its GPU time. "mma" is the Gluon kernel (kernels/bcq_mma.py), used by the dispatcher
up to the measured `mma_max_m`; "dense" is the dispatcher's large-M path (the dequantize kernel
writes Ŵᵀ, then torch.matmul). The record ends with a suggested DispatchConfig for this GPU: the packed
path with the least GPU time at each M (the host's launch time is about the same for every path).
Writes JSON and a PNG to benchmarks/results/.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib.util
import json
import math
import re
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from common import (check_output, description, environment, listed, no_nan, one_of, random_weight, result_path,
                    run_main)
from qdllm.engine.errors import SEED_MAX, ArgumentParser, bounded

SHAPES = {  # (N out, K in) of every distinct decoder linear
    "llada": {"q/k/v/o 4096x4096": (4096, 4096), "gate/up 12288x4096": (12288, 4096),
              "down 4096x12288": (4096, 12288)},
    "dream": {"q/o 3584x3584": (3584, 3584), "k/v 512x3584": (512, 3584), "gate/up 18944x3584": (18944, 3584),
              "down 3584x18944": (3584, 18944)},
}
GEMV_MAX_M = 256  # the split-K and mma launches are not timed above this (one program covers at most 64 rows)
FMA_MAX_M = 8  # nor its FMA variant above this (one program covers at most 2 rows)
KERNELS = ("mma", "gemv", "gemv_per_plane", "gemv_fma", "tile", "tile_per_plane", "dense")  # dense: dequantize + matmul
GRAPH_CALLS = 64  # calls per CUDA graph in the GPU timing
COLD_BYTES = 256 * 2**20  # weight copies a graph cycles through: five times an H100's or H200's 50 MB L2
HOST_CALLS = 50  # back-to-back calls per host timing
MAX_M = 65536  # far past the dense crossover; a larger M only runs out of memory


def spread(times: list[float]) -> dict:
    return {"min": min(times), "median": statistics.median(times), "max": max(times)}


def timed(fn: Callable[[], object], repeats: int) -> dict:
    """ms, eager: min/median/max over `repeats` do_bench medians; the first call (autotuning) is not timed."""
    from triton.testing import do_bench

    fn()
    torch.cuda.synchronize()
    return spread([do_bench(fn, return_mode="median") for _ in range(repeats)])


def gpu_timed(fns: list[Callable[[], object]], repeats: int) -> dict:
    """ms per call on the GPU: GRAPH_CALLS calls cycling through `fns` (the same call on distinct weight copies)
    captured in one CUDA graph, so no launch is timed; min/median/max over `repeats` replays."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for fn in fns:  # first calls outside the capture: autotuning, cuBLAS workspaces
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(GRAPH_CALLS):
            fns[i % len(fns)]()
    graph.replay()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / GRAPH_CALLS)
    del graph
    torch.cuda.empty_cache()
    return spread(times)


def host_timed(fn: Callable[[], object], repeats: int) -> dict:
    """ms per call to launch `fn`: HOST_CALLS calls back to back, without waiting for the GPU in between."""
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(HOST_CALLS):
            fn()
        times.append((time.perf_counter() - start) * 1e3 / HOST_CALLS)
    torch.cuda.synchronize()
    return spread(times)


def copies(t: torch.Tensor | object, nbytes: int) -> list:
    """`t` and clones of it at other addresses, enough that together they exceed COLD_BYTES (at most GRAPH_CALLS)."""
    n = min(GRAPH_CALLS, math.ceil(COLD_BYTES / nbytes))
    if isinstance(t, torch.Tensor):
        return [t] + [t.clone() for _ in range(n - 1)]
    return [t] + [dataclasses.replace(t, planes=t.planes.clone(), alpha_r=t.alpha_r.clone(),
                                      alpha_c=t.alpha_c.clone(), plane_ptr=t.plane_ptr.clone())
                  for _ in range(n - 1)]


def packed_bytes(w) -> int:
    return sum(t.numel() * t.element_size() for t in (w.planes, w.alpha_r, w.alpha_c, w.plane_ptr))


def measure(ws: list, dense_ts: list[torch.Tensor], ref: torch.Tensor, m: int, repeats: int, limits: dict,
            only: set[str] | None = None) -> dict:
    """One (shape, M) point: every path's eager, GPU and host time, speedups over torch, GB/s, the tile each
    autotuned to, and each packed path's relative error against `ref`, the reference Ŵ in fp32 (a wrong kernel
    is not timed as a fast one). `ws` and `dense_ts` are copies of one packed and one dense weight; `only` keeps
    those paths (torch is always timed)."""
    from qdllm.kernels import bcq, bcq_linear, bcq_mma

    w = ws[0]
    n, k = w.out_features, w.in_features
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    # name -> (the call on a given packed and dense weight, the autotuner it runs)
    paths = {"torch_bf16": (lambda w, d: torch.matmul(x, d), None),
             "dispatch": (lambda w, d: bcq_linear(x, w), None),
             "tile": (lambda w, d: bcq.bcq_tile(x, w), bcq._tile_kernel),
             "tile_per_plane": (lambda w, d: bcq.bcq_tile(x, w, "per_plane"), bcq._tile_kernel),
             "dense": (lambda w, d: bcq.bcq_dense(x, w), None)}
    if m <= GEMV_MAX_M:
        paths |= {"mma": (lambda w, d: bcq_mma.bcq_mma(x, w), bcq_mma._kernel),
                  "gemv": (lambda w, d: bcq.bcq_gemv(x, w), bcq._gemv_kernel),
                  "gemv_per_plane": (lambda w, d: bcq.bcq_gemv(x, w, "per_plane"), bcq._gemv_kernel)}
    if m <= FMA_MAX_M:
        paths["gemv_fma"] = (lambda w, d: bcq.bcq_gemv(x, w, "fma"), bcq._fma_kernel)
    if only is not None:
        paths = {name: path for name, path in paths.items() if name in only or name == "torch_bf16"}
    times, gpu_times, host_times, tiles, errors = {}, {}, {}, {}, {}
    y_ref = x.float() @ ref.T
    for name, (call, autotuner) in paths.items():
        fn = functools.partial(call, w, dense_ts[0])
        times[name] = timed(fn, repeats)
        weights = [(d, d) for d in dense_ts] if name == "torch_bf16" else [(c, None) for c in ws]
        gpu_times[name] = gpu_timed([functools.partial(call, *wd) for wd in weights], repeats)
        host_times[name] = host_timed(fn, repeats)
        if name != "torch_bf16":
            errors[name] = ((fn().float() - y_ref).norm() / y_ref.norm()).item()
        if autotuner is not None:  # best_config is the one for the call just made
            tiles[name] = str(autotuner.best_config)
    moved = {name: (2 * n * k if name == "torch_bf16" else packed_bytes(w)) + 2 * m * (k + n) for name in times}
    gbps = {name: moved[name] / (t["median"] * 1e6) for name, t in gpu_times.items()}
    return {
        "N": n, "K": k, "M": m, "effective_bits": w.effective_bits, "time_ms": times, "gpu_time_ms": gpu_times,
        "host_ms": host_times,
        "speedup": {name: times["torch_bf16"]["median"] / t["median"] for name, t in times.items()
                    if name != "torch_bf16"},
        "gpu_speedup": {name: gpu_times["torch_bf16"]["median"] / t["median"] for name, t in gpu_times.items()
                        if name != "torch_bf16"},
        "GBps": gbps, "fraction_of_copy_bandwidth": {name: v / limits["copy_GBps"] for name, v in gbps.items()},
        "ideal_speedup": min(16 / w.effective_bits, max(1.0, limits["ridge_R"] / m)), "autotuned": tiles,
        "relative_error": errors,
    }


def device_limits(repeats: int) -> dict:
    """Copy bandwidth (bytes read + written) and bf16 matmul FLOP/s, measured."""
    src = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    copy = timed(lambda: dst.copy_(src), repeats)
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    mm = timed(lambda: a @ a, repeats)
    bw = 2 * src.numel() / (copy["median"] * 1e-3)
    flops = 2 * 8192**3 / (mm["median"] * 1e-3)
    return {"copy_GBps": bw / 1e9, "bf16_TFLOPs": flops / 1e12, "ridge_R": flops / bw,
            "copy_ms": copy, "matmul_8192_ms": mm}


def suggest(rows: list[dict], ms: list[int]) -> dict:
    """Crossovers for DispatchConfig from the geometric mean GPU time over shapes of each path at each M."""
    def geo(m: int, name: str) -> float:
        ts = [r["gpu_time_ms"][name]["median"] for r in rows if r["M"] == m and name in r["gpu_time_ms"]]
        return math.exp(statistics.fmean(math.log(t) for t in ts)) if ts else math.inf

    best = {m: min(KERNELS, key=lambda name: geo(m, name)) for m in ms}
    dense_from = [m for m in ms if all(best[later] == "dense" for later in ms if later >= m)]
    dense_min_m = min(dense_from) if dense_from else 2 * max(ms)
    kernel_ms = [m for m in ms if m < dense_min_m]
    return {"best_path_per_M": best,
            "mma_max_m": max((m for m in kernel_ms if best[m] == "mma"), default=0),
            "fma_max_m": max((m for m in kernel_ms if best[m] == "gemv_fma"), default=0),
            "gemv_max_m": max((m for m in kernel_ms if best[m].startswith("gemv")), default=0),
            "plane_dot_max_m": max((m for m in kernel_ms if best[m].endswith("per_plane")), default=0),
            "dense_min_m": dense_min_m}


def plot(file: Path, record: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = list(dict.fromkeys((r["model"], r["shape"]) for r in record["rows"]))
    cols = 4
    nrows = math.ceil(len(shapes) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.4 * nrows), squeeze=False, sharey=True)
    for ax, (model, shape) in zip(axes.flat, shapes):
        rows = [r for r in record["rows"] if (r["model"], r["shape"]) == (model, shape)]
        for name in (*KERNELS, "dispatch"):
            pts = [(r["M"], r["gpu_speedup"][name]) for r in rows if name in r["gpu_speedup"]]
            ax.plot(*zip(*pts), marker="o", ms=3, label=name, linewidth=2.5 if name == "dispatch" else 1)
        eager = [(r["M"], r["speedup"]["dispatch"]) for r in rows if "dispatch" in r["speedup"]]
        if eager:
            ax.plot(*zip(*eager), ":", color="gray", linewidth=2, label="dispatch, eager (host launch included)")
        ax.plot([r["M"] for r in rows], [r["ideal_speedup"] for r in rows], "k--", label="ideal")
        ax.axhline(1, color="gray", linewidth=0.5)
        ax.set_xscale("log", base=2)
        ax.set_title(f"{model} {shape} (b_eff {rows[0]['effective_bits']:.2f})", fontsize=9)
        ax.set_xlabel("M (tokens)")
    for ax in axes.flat[len(shapes):]:
        ax.axis("off")
    axes[0, 0].set_ylabel("GPU-time speedup over torch bf16 matmul")
    axes[0, 0].legend(fontsize=7)
    fig.suptitle(f"BCQ kernels on {record['environment']['device']}")
    fig.tight_layout()
    fig.savefig(file, dpi=120)


def block_size(text: str) -> int:
    g = bounded(int, "--block-size", 32)(text)
    if g % 32:
        raise argparse.ArgumentTypeError(f"--block-size must be a multiple of 32, got {text!r}")
    return g


def main() -> None:
    ap = ArgumentParser(description=description(__doc__))
    ap.add_argument("--models", type=listed(one_of(tuple(SHAPES), "model"), "--models"), default="llada,dream",
                    help="comma-separated: llada, dream")
    ap.add_argument("--ms", type=listed(bounded(int, "--ms", 1, MAX_M), "--ms"),
                    default="1,8,16,32,64,128,256,512,1024", help="comma-separated token counts M")
    ap.add_argument("--block-size", type=block_size, default=128, help="a multiple of 32 that divides every K")
    ap.add_argument("--repeats", type=bounded(int, "--repeats", 1), default=5)
    ap.add_argument("--paths", type=listed(one_of((*KERNELS, "dispatch"), "path"), "--paths"), default=None,
                    help=f"comma-separated paths to time besides torch (default: all of {KERNELS} and dispatch)")
    ap.add_argument("--seed", type=bounded(int, "--seed", 0, SEED_MAX), default=0)
    ap.add_argument("--out", type=Path, default=None, help="output path stem (default: results/kernels-<device>)")
    args = ap.parse_args()
    models, ms = args.models, args.ms
    only = None if args.paths is None else set(args.paths)
    uneven = [shape for model in models for shape, (_, k) in SHAPES[model].items() if k % args.block_size]
    if uneven:
        ap.error(f"--block-size {args.block_size} does not divide K of {', '.join(uneven)}")
    if args.out is not None:  # here too, so that a bad --out is refused on any machine
        check_output("--out", args.out)
    if not torch.cuda.is_available():
        sys.exit("benchmarks/kernels.py needs a CUDA GPU, and torch sees none: nothing was measured.")
    if importlib.util.find_spec("triton") is None:
        sys.exit("benchmarks/kernels.py needs Triton (pip install triton): nothing was measured.")
    try:
        import matplotlib  # noqa: F401
        have_plot = True
    except ImportError:
        have_plot = False
        print("matplotlib is not installed: the JSON will be written but the PNG skipped (pip install matplotlib).")
    from tqdm import tqdm

    from qdllm.kernels import dequantize
    from qdllm.kernels.dispatch import config_for

    env = environment(torch.device("cuda"))
    slug = re.sub(r"[^a-z0-9]+", "-", env["device"].lower())
    out = args.out or Path(__file__).parent / "results" / f"kernels-{slug}"
    check_output("--out", out)
    print(f"{env['device']}: measuring copy bandwidth and bf16 matmul throughput")
    limits = device_limits(args.repeats)
    jobs = [(model, shape, n, k) for model in models for shape, (n, k) in SHAPES[model].items()]
    config = config_for(torch.device("cuda"))
    settings = {"models": models, "ms": ms, "block_size": args.block_size, "repeats": args.repeats,
                "seed": args.seed, "activations": "bfloat16", "order_mix": "5% order 1, 5% order 3, rest 2",
                "gemv_timed_up_to_M": GEMV_MAX_M, "fma_timed_up_to_M": FMA_MAX_M, "graph_calls": GRAPH_CALLS,
                "cold_weight_bytes": COLD_BYTES, "host_calls": HOST_CALLS,
                "dispatch_config": dataclasses.asdict(config),
                "paths": sorted(only) if only else [*KERNELS, "dispatch"]}
    rows = []
    with tqdm(total=len(jobs) * len(ms), unit="point") as bar:
        for i, (model, shape, n, k) in enumerate(jobs):
            w = random_weight(n, k, args.block_size, args.seed + i, torch.device("cuda"))
            ws = copies(w, packed_bytes(w))
            dense_ts = [t.T for t in copies(torch.randn(n, k, device="cuda", dtype=torch.bfloat16), 2 * n * k)]
            ref = dequantize(w, torch.float32)
            for m in ms:
                bar.set_description(f"{model} {shape} M={m}")
                rows.append({"model": model, "shape": shape,
                             **measure(ws, dense_ts, ref, m, args.repeats, limits, only)})
                gpu = rows[-1]["gpu_time_ms"]
                bar.write(f"{model} {shape} M={m}: GPU µs " + ", ".join(
                    f"{name} {t['median'] * 1e3:.1f}" for name, t in gpu.items()))
                bar.update()
            # Written after every shape, so a run stopped by a time limit keeps what it measured.
            del ref, ws, dense_ts
            record = {"environment": env, "device_limits": limits, "settings": settings,
                      "complete": i == len(jobs) - 1, "rows": rows, "suggested_config": suggest(rows, ms)}
            result_path(out, ".json").write_text(json.dumps(no_nan(record), indent=1))
            if have_plot:
                plot(result_path(out, ".png"), record)
    print(f"copy {limits['copy_GBps']:.0f} GB/s, bf16 {limits['bf16_TFLOPs']:.0f} TFLOP/s, R = {limits['ridge_R']:.0f}")
    for r in (r for r in rows if "dispatch" in r["gpu_time_ms"]):
        gpu, host = r["gpu_time_ms"]["dispatch"]["median"], r["host_ms"]["dispatch"]["median"]
        print(f"{r['model']:5} {r['shape']:20} M={r['M']:5}  dispatch: GPU {gpu * 1e3:6.1f} µs "
              f"({r['gpu_speedup']['dispatch']:5.2f}x), launch {host * 1e3:6.1f} µs, eager "
              f"{r['speedup']['dispatch']:5.2f}x  ideal {r['ideal_speedup']:5.2f}x  "
              f"best GPU {max(r['gpu_speedup'].values()):5.2f}x  "
              f"worst relative error {max(r['relative_error'].values()):.1e}")
    print(f"suggested DispatchConfig for {env['device']!r}: {record['suggested_config']}")
    print(f"wrote {result_path(out, '.json')}" + (f" and {result_path(out, '.png')}" if have_plot else ""))


if __name__ == "__main__":
    run_main(main)
