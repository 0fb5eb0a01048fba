"""Engine: generated tokens/s, forwards per request and agreement with the reference schedule, for the
cache policies (none, prefix, dual) with and without Fast-dLLM threshold decoding, at several batch sizes.

    python benchmarks/engine.py assets/llada-shakespeare

Prompts are chat turns made from the first speeches of the test plays (with --long-prompt, the first one
is a long stretch of the plays instead). Every request decodes its whole
canvas (ignore_eos), so each configuration generates the same number of tokens; tokens/s counts generated
tokens only (never the prompt) over the wall time of the whole batch of requests. Agreement is the share
of generated positions whose token equals the reference's (cache "none", the linear schedule, one token
per step); one early difference changes the rest of the text, so the first diverging position is recorded
too. Writes JSON and a PNG to benchmarks/results/.
"""
from __future__ import annotations

import itertools
import statistics
import time
from pathlib import Path

import torch
from tqdm import tqdm

from common import check_output, confidence, description, environment, listed, run_main, write_results
from shakespeare import speeches, test_plays
from qdllm.engine import Detokenizer, EngineCore, SamplingParams, load_model, load_tokenizer
from qdllm.engine.errors import ArgumentParser, bounded
from qdllm.engine.loader import check_dir, read_config, resolve_device
from qdllm.engine.sequence import block_layout
from qdllm.engine.tokenizer import chat_prompt, end_token_ids

CACHES = ("none", "prefix", "dual")


def run(model, detok: Detokenizer, prompts: list[list[int]], params: SamplingParams, batch: int):
    """All prompts through one engine with `batch` sequence slots; (seconds, outputs, engine stats)."""
    core = EngineCore(model, detok, max_num_seqs=batch)
    ids = [core.add_request(p, params) for p in prompts]
    final = {}
    sync = torch.cuda.synchronize if model.embed.weight.is_cuda else (lambda: None)
    sync()
    t0 = time.perf_counter()
    while core.has_unfinished():
        final.update((o.request_id, o) for o in core.step() if o.finished)
    sync()
    return time.perf_counter() - t0, [final[i] for i in ids], core.stats


def plot(file: Path, record: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = record["results"]
    batches = sorted({r["batch"] for r in rows})
    labels = list(dict.fromkeys(r["label"] for r in rows))
    fig, ax = plt.subplots(figsize=(1.4 * len(labels) + 3, 4.5))
    width = 0.8 / len(batches)
    for i, b in enumerate(batches):
        med = [next(r["tokens_per_s"]["median"] for r in rows if r["label"] == lab and r["batch"] == b)
               for lab in labels]
        ax.bar([x + i * width for x in range(len(labels))], med, width, label=f"batch {b}")
    ax.set_xticks([x + width * (len(batches) - 1) / 2 for x in range(len(labels))], labels, rotation=20)
    ax.set_ylabel("generated tokens/s (median)")
    env = record["environment"]
    ax.set_title(f"qdllm engine, {Path(record['settings']['model']).name}, gen {record['settings']['max_tokens']}, "
                 f"block {record['settings']['block_length']}\n{env['device']}, {env['date']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(file, dpi=120)


def main() -> None:
    ap = ArgumentParser(description=description(__doc__))
    ap.add_argument("model", nargs="?", default="assets/llada-shakespeare")
    ap.add_argument("--prompts", type=bounded(int, "--prompts", 1), default=8)
    ap.add_argument("--max-tokens", type=bounded(int, "--max-tokens", 1), default=128)
    ap.add_argument("--block-length", type=bounded(int, "--block-length", 1), default=32)
    ap.add_argument("--batch", type=listed(bounded(int, "--batch", 1), "--batch"), default="1,8",
                    help="comma-separated sequence-slot counts")
    ap.add_argument("--thresholds", type=listed(confidence("--thresholds", none=True), "--thresholds"),
                    default="none,0.9",
                    help="comma-separated; none is the linear schedule")
    ap.add_argument("--repeats", type=bounded(int, "--repeats", 1), default=3)
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--long-prompt", type=bounded(int, "--long-prompt", 0), default=0,
                    help="make the first prompt a chat turn of this many tokens of the plays (0: off), so one "
                         "long request runs among short ones")
    ap.add_argument("--out", default="benchmarks/results/engine")
    args = ap.parse_args()

    device = resolve_device(args.device, "--device")  # a ValueError is one line, through run_main
    # every file is read and checked here, before the model loads
    check_dir(Path(args.model), "a Hugging Face checkpoint directory")
    cfg = read_config(args.model)
    data = test_plays(args.model)
    tok = load_tokenizer(args.model)
    try:
        texts = speeches(data, args.prompts)
    except ValueError as e:
        ap.error(f"--prompts {args.prompts}: {e}")
    prompts = [chat_prompt(tok, [{"role": "user", "content": s}]) for s in texts]
    if args.long_prompt:
        ids = tok.encode(data.read_text(encoding="utf-8"), add_special_tokens=False)
        if args.long_prompt > len(ids):
            ap.error(f"--long-prompt {args.long_prompt}: {data} holds only {len(ids)} tokens")
        text = tok.decode(ids[: args.long_prompt], skip_special_tokens=True)
        prompts[0] = chat_prompt(tok, [{"role": "user", "content": text}])
    block, n_blocks = block_layout(SamplingParams(max_tokens=args.max_tokens, block_length=args.block_length))
    canvas = block * n_blocks
    longest = max(map(len, prompts))
    if longest + canvas > cfg.max_seq_len:
        ap.error(f"the longest prompt ({longest} tokens{', --long-prompt' if args.long_prompt else ''})"
                 f" plus --max-tokens {args.max_tokens} in whole blocks of --block-length {block} ({canvas} tokens) "
                 f"exceeds the model's context of {cfg.max_seq_len} tokens")
    out = Path(args.out + f"-{device.type}")
    check_output("--out", out, inputs=[Path(args.model)])
    model = load_model(args.model, device=device, dtype=getattr(torch, args.dtype))
    detok = Detokenizer(tok, end_token_ids(tok, model.config.eos_token_ids))
    batches = args.batch
    thresholds = args.thresholds

    def params(cache: str, threshold: float | None) -> SamplingParams:
        return SamplingParams(max_tokens=args.max_tokens, block_length=args.block_length, cache=cache,
                              threshold=threshold, ignore_eos=True)

    reference = run(model, detok, prompts, params("none", None), max(batches))[1]
    configs = list(itertools.product(thresholds, CACHES, batches))
    results = []
    for threshold, cache, batch in tqdm(configs, desc="engine benchmark", unit="config"):
        times, outs, stats = [], None, None
        for _ in range(args.repeats):
            t, outs, stats = run(model, detok, prompts, params(cache, threshold), batch)
            times.append(t)
        generated = sum(len(o.token_ids) for o in outs)
        same = sum(a == b for o, r in zip(outs, reference) for a, b in zip(o.token_ids, r.token_ids))
        # the first generated position where a request leaves the reference (its length if never)
        diverge = [next((i for i, (a, b) in enumerate(zip(o.token_ids, r.token_ids)) if a != b), len(o.token_ids))
                   for o, r in zip(outs, reference)]
        rates = sorted(generated / t for t in times)
        results.append({
            "label": f"{cache}" + ("" if threshold is None else f" + thr {threshold}"),
            "cache": cache, "threshold": threshold, "batch": batch,
            "tokens_per_s": {"min": rates[0], "median": statistics.median(rates), "max": rates[-1]},
            "seconds": sorted(times), "generated_tokens": generated,
            "nfe_per_request": statistics.mean(o.nfe for o in outs),
            "forwards": stats.forwards, "batch_occupancy": stats.batch_occupancy,
            "agreement_with_reference": same / generated,
            "first_divergence": diverge,
        })
    record = {"benchmark": "engine", "environment": environment(device),
              "settings": {"model": args.model, "prompts": len(prompts), "max_tokens": args.max_tokens,
                           "block_length": args.block_length, "steps": "max_tokens (one token per step)",
                           "temperature": 0.0, "remasking": "low_confidence", "ignore_eos": True,
                           "repeats": args.repeats, "dtype": args.dtype, "batches": batches,
                           "thresholds": thresholds, "long_prompt": args.long_prompt,
                           "prompt_tokens": [len(p) for p in prompts]},
              "results": results}
    write_results(out, record, plot)
    for r in results:
        print(f"{r['label']:>20} batch {r['batch']:>2}: {r['tokens_per_s']['median']:7.1f} tok/s "
              f"(min {r['tokens_per_s']['min']:.1f}, max {r['tokens_per_s']['max']:.1f}), "
              f"nfe/request {r['nfe_per_request']:.1f}, agreement {r['agreement_with_reference']:.3f}, "
              f"first divergence median {statistics.median(r['first_divergence'])}")


if __name__ == "__main__":
    run_main(main)
