"""Conversion speed: seconds to quantize one linear, per method and shape, on the device that converts.

    python benchmarks/convert.py [--shapes 4096x4096,12288x4096,4096x12288] [--methods quant-dllm,gptq,rtn]
                                 [--device cuda] [--repeats 3]

A shape is N (out) x K (in); the defaults are LLaDA-8B's decoder linears. Each timed call is exactly what
`qdllm-convert` does per linear once its H is captured: `Method.quantize(W, H)`, packing included. The
work does not depend on the values (DAQ runs a fixed 15 iterations and the refinement a fixed number of
rounds), so W is random and H is the second moment of random activations with uneven channel scales,
accumulated as the pipeline accumulates it. The first call per (shape, method) is a warm-up and is not
timed. Writes JSON (min/median/max over the repeats, every setting, device, versions, commit) and a PNG
to benchmarks/results/.
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from tqdm import tqdm

from common import check_output, description, environment, listed, one_of, run_main, write_results
from qdllm.engine.errors import SEED_MAX, ArgumentParser, bounded
from qdllm.engine.evaluate import device_memory, out_of_memory
from qdllm.engine.loader import resolve_device
from qdllm.quantizer.hessian import HessianAccumulator
from qdllm.quantizer.methods import METHODS, Method

LLADA_8B = "4096x4096,12288x4096,4096x12288"


def parse_shape(text: str) -> tuple[int, int]:
    n, sep, k = text.partition("x")
    if not sep or not n.isdecimal() or not k.isdecimal() or int(n) < 1 or int(k) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not NxK with positive integers, e.g. 4096x12288")
    if int(k) % Method.block_size:
        raise argparse.ArgumentTypeError(f"K must be a multiple of the block size {Method.block_size}, got {text!r}")
    return int(n), int(k)


def calibration_h(k: int, tokens: int, seed: int, device: torch.device) -> torch.Tensor:
    """H of `tokens` random activations whose channel scales spread over two decades, like real inputs."""
    gen = torch.Generator(device=device).manual_seed(seed)
    scales = torch.logspace(-1, 1, k, device=device)[torch.randperm(k, generator=gen, device=device)]
    acc = HessianAccumulator(k, device)
    for lo in range(0, tokens, 4096):
        acc.add(torch.randn(min(4096, tokens - lo), k, generator=gen, device=device) * scales)
    return acc.H


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_method(method: Method, W: torch.Tensor, H: torch.Tensor, repeats: int, device: torch.device) -> dict:
    """Seconds per call: min/median/max over `repeats`, after one untimed warm-up."""
    times = []
    for i in range(repeats + 1):
        sync(device)
        start = time.perf_counter()
        q = method.quantize(W, H)
        q.weight.sum().item()  # waits for the device, as writing the shard does
        if i:
            times.append(time.perf_counter() - start)
    return {"min": min(times), "median": statistics.median(times), "max": max(times), "all": times,
            "effective_bits": q.effective_bits}


def plot(file: Path, record: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes, methods = record["settings"]["shapes"], record["settings"]["methods"]
    fig, ax = plt.subplots(figsize=(2.2 * len(shapes) + 3, 4.5))
    width = 0.8 / len(methods)
    for j, m in enumerate(methods):
        rows = [record["results"][s][m] for s in shapes]
        med = [r["median"] for r in rows]
        err = [[r["median"] - r["min"] for r in rows], [r["max"] - r["median"] for r in rows]]
        ax.bar([i + j * width for i in range(len(shapes))], med, width, yerr=err, capsize=3, label=m)
    ax.set_xticks([i + width * (len(methods) - 1) / 2 for i in range(len(shapes))], shapes)
    ax.set_yscale("log")
    ax.set_ylabel("seconds per linear (median; bars: min-max)")
    env = record["environment"]
    ax.set_title(f"qdllm-convert, one linear: {env['device']}, {env['date']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(file, dpi=120)


def main() -> None:
    ap = ArgumentParser(description=description(__doc__))
    ap.add_argument("--shapes", type=listed(parse_shape, "--shapes"), default=LLADA_8B,
                    help="comma-separated NxK (out x in)")
    ap.add_argument("--methods", type=listed(one_of(METHODS, "method"), "--methods"), default=",".join(METHODS),
                    help=f"comma-separated, from {', '.join(METHODS)}")
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda when present)")
    ap.add_argument("--repeats", type=bounded(int, "--repeats", 1), default=3)
    ap.add_argument("--tokens", type=bounded(int, "--tokens", 1), default=16384, help="activations behind each H")
    ap.add_argument("--refine-rounds", type=bounded(int, "--refine-rounds", 0, 20), default=Method.refine_rounds)
    ap.add_argument("--seed", type=bounded(int, "--seed", 0, SEED_MAX), default=0)
    ap.add_argument("--out", type=Path, default=None, help="output path stem (default: results/convert-<device>)")
    args = ap.parse_args()
    shapes = {f"{n}x{k}": (n, k) for n, k in args.shapes}
    methods = args.methods
    device = resolve_device(args.device, "--device")
    for label, (n, k) in shapes.items():
        need = 4 * (n * k + k * k)  # W and H in fp32, before any working copy: a shape that fails for certain
        if need > device_memory(device):
            raise ValueError(f"--shapes {label}: W and H alone take {need / 2**30:.0f} GiB, more than the "
                             f"{device_memory(device) / 2**30:.0f} GiB of {device}")
    out = args.out or Path(__file__).parent / "results" / f"convert-{device.type}"
    check_output("--out", out)

    results: dict[str, dict] = {}
    bar = tqdm(total=len(shapes) * len(methods), desc="convert", unit="linear")
    for label, (n, k) in shapes.items():
        try:
            gen = torch.Generator(device=device).manual_seed(args.seed)
            W = torch.randn(n, k, generator=gen, device=device) * k ** -0.5
            H = calibration_h(k, args.tokens, args.seed, device)
            results[label] = {}
            for m in methods:
                bar.set_postfix(shape=label, method=m)
                method = Method(name=m, refine_rounds=args.refine_rounds)
                r = results[label][m] = time_method(method, W, H, args.repeats, device)
                tqdm.write(f"{label} {m}: median {r['median']:.2f} s (min {r['min']:.2f}, max {r['max']:.2f}), "
                           f"{r['effective_bits']:.3f} bits")
                bar.update()
        except (MemoryError, RuntimeError) as e:
            if not out_of_memory(e):
                raise
            bar.close()
            raise ValueError(f"--shapes {label}: out of memory on {device}; give a smaller shape") from None
        del W, H
    bar.close()
    settings = {**vars(args), "shapes": list(shapes), "methods": methods, "device": str(device),
                "block_size": Method.block_size, "iterations": Method.iterations, "abmp_ratio": Method.abmp_ratio}
    record = {"settings": settings, "results": results, "environment": environment(device)}
    write_results(out, record, plot)


if __name__ == "__main__":
    run_main(main)
