"""Quality: the masked-diffusion perplexity bound on held-out text of the full-precision model, the 2-bit
baselines, Quant-dLLM and its ablations, against a unigram baseline.

    python benchmarks/quality.py assets/llada-shakespeare --mc 16

Each variant is converted by `qdllm-convert` (timed) from the model folder with its own calibration text
(train split only), then scored by `qdllm-eval`'s estimator on the same test windows with the same mask
seed, so differences between variants carry little Monte Carlo noise; each variant's NLL is also given as a
paired difference from fp and gptq-2bit, with that difference's own standard error. The unigram baseline is fitted on
the train split (add-one smoothing) and scored on the same tokens. Writes JSON and a PNG to
benchmarks/results/.

With --mirror (the default), each converted variant is also scored with its weight error reversed, every
quantized W + E replaced by W − E. Half the sum of the two changes from fp is the even part of the
change, ½EᵀFE to second order: the damage that grows with the error's size. Half their difference is the
odd part, gᵀE: how the error happens to line up with the gradient g of the test NLL. For a converged model
g ≈ 0; the shipped model is still learning, so g is not small, and a variant can beat FP on the odd part
alone.
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from collections import Counter
from pathlib import Path

import torch
from tqdm import tqdm

import shakespeare
from common import (check_output, description, environment, listed, no_nan, one_of, result_path, run_main,
                    write_results)
from qdllm.engine import load_model, load_tokenizer
from qdllm.engine.artifact import MANIFEST
from qdllm.engine.corpus import DataError, read_texts, token_stream
from qdllm.engine.errors import SEED_MAX, ArgumentParser, bounded
from qdllm.engine.evaluate import MAX_MC, Estimate, difference, evaluate
from qdllm.engine.loader import read_config, resolve_device
from qdllm.engine.model import DiffusionLM
from qdllm.engine.quant_linear import QuantLinear
from qdllm.engine.tokenizer import check_vocab
from qdllm.kernels.reference import dequantize
from qdllm.quantizer.artifact import PARTIAL
from qdllm.quantizer.calibration import calibration_file
from qdllm.quantizer.cli import main as convert

VARIANTS: dict[str, list[str] | None] = {  # label -> qdllm-convert flags (None: the unconverted model)
    "fp": None,
    "rtn-2bit": ["--method", "rtn"],
    "gptq-2bit": ["--method", "gptq"],
    "quant-dllm-2bit": [],
    "quant-dllm-paper-daq": ["--refine-rounds", "0"],
    "quant-dllm-no-mcs": ["--no-mcs"],
    "quant-dllm-no-abmp": ["--abmp-ratio", "0"],
    "quant-dllm-naive-daq": ["--naive-daq"],
}

# Every later variant's NLL is also given as a difference from these, sample by sample on the same masks:
# far less noisy than comparing two bounds, each of which carries the full Monte Carlo error.
PAIRED_WITH = ("fp", "gptq-2bit")


def unigram_nll(train: list[int], test: list[int], vocab: int) -> float:
    """Per-token NLL (nats) of test tokens under add-one-smoothed train unigram frequencies."""
    counts = Counter(train)
    total = len(train) + vocab
    return -sum(math.log((counts[t] + 1) / total) for t in test) / len(test)


def effective_weight(module: torch.nn.Module) -> torch.Tensor:
    """What a linear computes with, in fp32."""
    if isinstance(module, QuantLinear):
        return dequantize(module.weight_packed, torch.float32)
    return module.weight.float()


@torch.no_grad()
def mirror(reference: DiffusionLM, variant: DiffusionLM) -> None:
    """Turn `reference` into the variant with its error reversed: every linear W becomes W − (Q − W)."""
    quantized = dict(variant.named_modules())
    for name, module in reference.named_modules():
        if isinstance(module, torch.nn.Linear):
            module.weight.copy_(2 * module.weight - effective_weight(quantized[name]).to(module.weight))


def even_odd(plus: Estimate, minus: Estimate, fp: Estimate) -> dict[str, dict[str, float]]:
    """The change from fp split into its even part (damage) and odd part (first order), per sample."""
    parts = {"even": Estimate(fp.tokens, (plus.samples + minus.samples) / 2 - fp.samples),
             "odd": Estimate(fp.tokens, (plus.samples - minus.samples) / 2)}
    return {k: {"nll_difference": e.nll_per_token, "stderr": e.stderr} for k, e in parts.items()}


def plot(file: Path, record: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = record["results"]
    labels = [k for k in res if k != "unigram"]
    fig, ax = plt.subplots(figsize=(1.3 * len(labels) + 3, 4.5))
    ax.bar(labels, [res[k]["ppl"] for k in labels], yerr=[res[k]["ppl_stderr"] for k in labels], capsize=4)
    ax.axhline(res["unigram"]["ppl"], color="gray", linestyle="--", label=f"unigram {res['unigram']['ppl']:.0f}")
    ax.set_ylabel("perplexity bound (lower is better)")
    ax.set_title(f"{Path(record['data']).name}: {record['tokens']} tokens, mc={record['mc']}, "
                 f"{record['environment']['date']}")
    ax.tick_params(axis="x", labelrotation=20)
    ax.legend()
    fig.tight_layout()
    fig.savefig(file, dpi=120)


def check_work(work: Path, labels: list[str], inputs: list[Path]) -> None:
    """Refuse a --work folder that holds an input, or a variant's folder there that is not ours to replace:
    only an artifact, an interrupted conversion or an empty folder is removed before its conversion."""
    for src in inputs:
        if src.resolve() == work.resolve() or src.resolve().is_relative_to(work.resolve()):
            raise ValueError(f"--work {work}: holds the input {src}; its variant folders are replaced")
    check_output("--work", work / labels[0], inputs)
    for label in labels:
        path = work / label
        ours = path.is_dir() and ((path / MANIFEST).is_file() or (path / PARTIAL).is_file() or not any(path.iterdir()))
        if path.is_symlink() or (path.exists() and not ours):
            raise ValueError(f"--work {work}: {path} is not an artifact, an interrupted conversion or an empty "
                             "folder; remove it or choose another --work (nothing was deleted)")


def main() -> None:
    ap = ArgumentParser(description=description(__doc__))
    ap.add_argument("model", type=Path, help="HF checkpoint folder (with data/test.txt and data/calibration.txt)")
    ap.add_argument("--variants", type=listed(one_of(VARIANTS, "variant"), "--variants"), default=",".join(VARIANTS),
                    help=f"comma-separated, from {', '.join(VARIANTS)}")
    ap.add_argument("--data", type=Path, default=None, help="held-out text (default: MODEL/data/test.txt)")
    ap.add_argument("--mc", type=bounded(int, "--mc", 1, MAX_MC), default=16)
    ap.add_argument("--seed", type=bounded(int, "--seed", 0, SEED_MAX), default=0)
    ap.add_argument("--batch-size", type=bounded(int, "--batch-size", 1), default=32)
    ap.add_argument("--device", default=None)
    ap.add_argument("--mirror", action=argparse.BooleanOptionalAction, default=True,
                    help="also score each converted variant with its error reversed (even and odd parts)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/qdllm-quality"), help="where artifacts are written")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "quality")
    args = ap.parse_args()
    labels = args.variants
    if args.mirror and labels[0] != "fp":
        ap.error("--mirror needs fp as the first of --variants (or give --no-mirror)")
    device = resolve_device(args.device, "--device")
    data = args.data or args.model / "data" / "test.txt"
    if (args.model / MANIFEST).is_file():
        raise ValueError(f"{args.model}: is a qdllm artifact ({MANIFEST}); give the original checkpoint")
    cfg = read_config(args.model)
    texts = read_texts(data)
    converted = [label for label in labels if VARIANTS[label] is not None]
    if converted:
        calibration_file(args.model, None)
        check_work(args.work, converted, [args.model, data])
    check_output("--out", args.out, inputs=[args.model, data, args.work])
    tok = load_tokenizer(args.model)
    check_vocab(tok, cfg.vocab_size, args.model)
    test = token_stream(tok, texts, tok.eos_token_id)
    if cfg.mask_token_id in test:
        raise DataError(f"{data}: the text contains the mask token; it cannot be scored")
    train = token_stream(tok, list(shakespeare.load_split("train").values()), tok.eos_token_id)
    uni = unigram_nll(train, test, len(tok))
    estimates: dict[str, Estimate] = {}
    results: dict[str, dict] = {"unigram": {"nll_per_token": uni, "ppl": math.exp(uni), "fitted_on": "train split"}}
    dtype = torch.float32 if device.type == "cpu" else None
    for label in tqdm(labels, desc="quality", unit="variant"):
        flags, path, entry = VARIANTS[label], args.model, {}
        if flags is not None:
            path = args.work / label
            shutil.rmtree(path, ignore_errors=True)  # check_work allowed it: our own artifact, or nothing
            start = time.time()
            convert([str(args.model), str(path), "--device", str(device), *flags])
            manifest = json.loads((path / MANIFEST).read_text())
            entry = {"flags": flags, "convert_seconds": round(time.time() - start, 1),
                     "effective_bits": manifest["effective_bits"], "orders": manifest["orders"],
                     "mean_layer_relative_error": sum(r["relative_error"] for r in manifest["layers"]) /
                     len(manifest["layers"])}
        start = time.time()
        model = load_model(path, device=device, dtype=dtype)
        seqlen = min(model.config.max_seq_len, 1024)
        est = estimates[label] = evaluate(model, test, seqlen, args.mc, args.seed, args.batch_size)
        nll, se = est.nll_per_token, est.stderr
        paired = {ref: dict(zip(("nll_difference", "stderr"), difference(est, estimates[ref])))
                  for ref in PAIRED_WITH if ref in estimates and ref != label}
        if args.mirror and flags is not None:
            reversed_ = load_model(args.model, device=device, dtype=dtype)
            mirror(reversed_, model)
            del model
            minus = evaluate(reversed_, test, seqlen, args.mc, args.seed, args.batch_size)
            entry["mirror"] = even_odd(est, minus, estimates["fp"])
            del reversed_
        results[label] = {**entry, "nll_per_token": nll, "nll_stderr": se, "ppl": math.exp(nll),
                          "ppl_stderr": math.exp(nll) * se, "paired": paired, "windows": est.windows,
                          "seqlen": seqlen, "eval_seconds": round(time.time() - start, 1)}
        parts = "".join(f"; {k} part {v['nll_difference']:+.4f} ± {v['stderr']:.4f}"
                        for k, v in entry.get("mirror", {}).items())
        tqdm.write(f"{label}: perplexity bound {math.exp(nll):.2f} ± {math.exp(nll) * se:.2f}{parts}")
        record = {"model": str(args.model), "data": str(data), "tokens": len(test), "mc": args.mc,
                  "seed": args.seed, "results": results, "environment": environment(device)}
        # after each variant; with --mc 1 the standard errors are NaN, which JSON lacks: null
        result_path(args.out, ".json").write_text(json.dumps(no_nan(record), indent=2) + "\n")
    print(f"unigram: perplexity {math.exp(uni):.2f}")
    write_results(args.out, record, plot)


if __name__ == "__main__":
    run_main(main)
