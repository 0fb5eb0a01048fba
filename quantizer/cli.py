"""`qdllm-convert SRC OUT`: quantize a Hugging Face dLLM checkpoint into a packed qdllm artifact."""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from importlib.metadata import version
from pathlib import Path

import torch

from qdllm.engine import SamplingParams, load_tokenizer, read_config
from qdllm.engine.artifact import MANIFEST, sha256_file
from qdllm.engine.errors import SEED_MAX, ArgumentParser, bounded
from qdllm.engine.loader import check_layer_count, check_tensors, empty_model, resolve_device, shard_files
from qdllm.engine.tokenizer import check_vocab

from .artifact import ArtifactWriter
from .calibration import calibration_file, calibration_windows
from .mcs import mcs_batch
from .methods import METHODS, Method
from .pipeline import convert

ABMP_DEFAULT = {"llada": 0.05, "dream": 0.10}  # the paper's ratios
PREFIX_RATIO = 0.25


def parser() -> argparse.ArgumentParser:
    ap = ArgumentParser(prog="qdllm-convert", description="Quantize a Hugging Face dLLM checkpoint (LLaDA, Dream) "
                        "to about 2 bits per weight with Quant-dLLM (MCS + DAQ + ABMP), into a packed artifact.")
    ap.add_argument("src", type=Path, help="Hugging Face checkpoint directory")
    ap.add_argument("out", type=Path, help="artifact directory to create")
    ap.add_argument("--method", choices=METHODS, default="quant-dllm",
                    help="quant-dllm (default); gptq and rtn are the uniform baselines")
    ap.add_argument("--bits", type=bounded(int, "--bits", 1, 8), default=2,
                    help="bits per weight before scales: 2 for quant-dllm (default); 2-8 for gptq and rtn")
    ap.add_argument("--block-size", type=bounded(int, "--block-size", 32), default=128,
                    help="columns per block (quant-dllm) or per group (gptq/rtn), a multiple of 32 (default 128)")
    ap.add_argument("--abmp-ratio", type=bounded(float, "--abmp-ratio", 0.0, 0.5), default=None,
                    help="share of blocks moved to order 1 and to order 3 (default 0.05 LLaDA, 0.10 Dream; 0 = off)")
    ap.add_argument("--no-mcs", action="store_true", help="calibrate on fully visible text (ablation)")
    ap.add_argument("--prefix-ratio", type=bounded(float, "--prefix-ratio", 0.0, 1.0), default=None,
                    help=f"MCS: leading share of each window never masked (default {PREFIX_RATIO})")
    ap.add_argument("--naive-daq", action="store_true", help="DAQ without salience weights or refinement (ablation)")
    ap.add_argument("--refine-rounds", type=bounded(int, "--refine-rounds", 0, 20), default=None,
                    help="rounds of DAQ's output-aware refinement, a qdllm addition (default 3; 0 = the paper's DAQ)")
    ap.add_argument("--calib", type=Path, default=None,
                    help="calibration text: plain text, or .jsonl with a 'text' field "
                         "(default: SRC/data/calibration.txt)")
    ap.add_argument("--nsamples", type=bounded(int, "--nsamples", 1, 65536), default=128,
                    help="calibration windows (default 128)")
    ap.add_argument("--seqlen", type=bounded(int, "--seqlen", 1), default=None,
                    help="tokens per window (default: the model's max_sequence_length, at most 4096)")
    ap.add_argument("--batch-size", type=bounded(int, "--batch-size", 1), default=8,
                    help="calibration windows per forward (default 8)")
    ap.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available)")
    ap.add_argument("--seed", type=bounded(int, "--seed", 0, SEED_MAX), default=0,
                    help="calibration sampling and MCS seed (default 0)")
    ap.add_argument("--resume", action="store_true", help="continue an interrupted conversion into OUT")
    return ap


def method_of(args: argparse.Namespace, family: str) -> Method:
    if args.block_size % 32:
        raise ValueError(f"--block-size must be a multiple of 32, got {args.block_size}")
    if args.method == "quant-dllm":
        if args.bits != 2:
            raise ValueError(f"--bits must be 2 for quant-dllm (1 to 3 binary planes per block, 2 on average), "
                             f"got {args.bits}")
        ratio = ABMP_DEFAULT[family] if args.abmp_ratio is None else args.abmp_ratio
        rounds = {} if args.refine_rounds is None else {"refine_rounds": args.refine_rounds}  # else Method's default
        return Method("quant-dllm", 2, args.block_size, ratio, args.naive_daq, **rounds)
    if args.bits < 2:
        raise ValueError(f"--bits must be 2..8 for {args.method}, got {args.bits}")
    for flag, given in (("--abmp-ratio", args.abmp_ratio is not None), ("--naive-daq", args.naive_daq),
                        ("--refine-rounds", args.refine_rounds is not None)):
        if given:
            raise ValueError(f"{flag} applies to --method quant-dllm only")
    return Method(args.method, args.bits, args.block_size)


def run(args: argparse.Namespace) -> Path:
    if (args.src / MANIFEST).exists():
        raise ValueError(f"{args.src}: is a qdllm artifact ({MANIFEST}); convert the original checkpoint")
    cfg = read_config(args.src)
    where = shard_files(args.src)
    check_layer_count(args.src, cfg, where)
    # every tensor the conversion reads, from the headers now rather than hours in, when its layer comes
    check_tensors(args.src, cfg, {n: p.shape for n, p in empty_model(cfg, args.src).state_dict().items()}, where)
    method = method_of(args, cfg.family)
    mcs = method.name != "rtn" and not args.no_mcs
    if args.prefix_ratio is not None and not mcs:
        raise ValueError("--prefix-ratio applies to MCS only (not with --no-mcs or --method rtn)")
    prefix_ratio = PREFIX_RATIO if args.prefix_ratio is None else args.prefix_ratio
    device = resolve_device(args.device, "--device")
    seqlen = args.seqlen or min(cfg.max_seq_len, 4096)
    if seqlen > cfg.max_seq_len:
        raise ValueError(f"--seqlen must be at most the model's max_sequence_length ({cfg.max_seq_len}), got {seqlen}")
    for dim, name in ((cfg.d_model, "d_model"), (cfg.mlp_hidden, "the MLP width")):
        if dim % method.block_size:
            raise ValueError(f"--block-size {method.block_size} does not divide {name} ({dim}) of {args.src}")
    calib = calibration_file(args.src, args.calib)
    tokenizer = load_tokenizer(args.src)
    check_vocab(tokenizer, cfg.vocab_size, args.src)
    eos = cfg.eos_token_ids[0] if cfg.eos_token_ids else None
    windows = calibration_windows(tokenizer, calib, args.nsamples, seqlen, args.seed, eos)
    # absolute paths: a --resume that spells SRC or --calib another way is the same conversion
    header = {
        "format": "qdllm", "qdllm_version": version("qdllm"),
        "source": {"path": str(args.src.resolve()), "config_sha256": sha256_file(args.src / "config.json")},
        "architecture": {k: (str(v).removeprefix("torch.") if isinstance(v, torch.dtype) else v)
                         for k, v in asdict(cfg).items()},
        "quantization": {"method": method.name, "bits": method.bits, "block_size": method.block_size,
                         "abmp_ratio": method.abmp_ratio if method.name == "quant-dllm" else None,
                         "naive_daq": method.naive_daq, "daq_iterations": method.iterations,
                         "refine_rounds": method.refine_rounds if method.name == "quant-dllm" else None,
                         "percdamp": method.percdamp,
                         "storage": "bcq" if method.name == "quant-dllm" else "dense-fp16"},
        "calibration": {"source": str(calib.resolve()), "sha256": sha256_file(calib), "nsamples": args.nsamples,
                        "seqlen": seqlen, "seed": args.seed, "mcs": mcs,
                        "mcs_prefix_ratio": prefix_ratio if mcs else None},
        "generation": {k: v for k, v in asdict(SamplingParams()).items()  # the sampler's defaults for this model
                       if v is not None and k not in ("stop", "logit_bias")},
    }
    writer = ArtifactWriter(args.out, header, cfg.n_layers, args.resume)
    if args.resume and writer.fresh:  # still started: a run that failed before writing OUT resumes the same way
        print(f"qdllm-convert: --resume: OUT ({args.out}) holds no interrupted conversion; starting a new one",
              file=sys.stderr)
    ids = mcs_batch(windows, cfg.mask_token_id, prefix_ratio, args.seed, enabled=mcs)
    dtype = cfg.torch_dtype or torch.float16
    try:
        convert(args.src, cfg, ids, method, writer, device, args.batch_size, dtype)
    except Exception:
        writer.discard_if_unstarted()
        raise
    return args.out


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    try:
        out = run(args)
    except ValueError as e:  # CheckpointError, DataError, ArtifactError and bad settings: one line each
        print(f"qdllm-convert: error: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:  # a full disk, say: finished layers stay in OUT for --resume
        print(f"qdllm-convert: error: {e.filename or args.out}: {e.strerror or e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"qdllm-convert: interrupted; finished layers are kept in {args.out}: run the same command with "
              "--resume to continue", file=sys.stderr)
        sys.exit(130)
    print_summary(out)


def print_summary(out: Path) -> None:
    manifest = json.loads((out / MANIFEST).read_text())
    print(f"{'layer':>5} {'bits':>6} {'rel. error':>10}  orders", file=sys.stderr)
    for r in manifest["layers"]:
        print(f"{r['index']:>5} {r['effective_bits']:>6.3f} {r['relative_error']:>10.4f}  {r['orders']}",
              file=sys.stderr)
    print(f"qdllm-convert: wrote {out}: {manifest['effective_bits']:.3f} effective bits per weight over "
          f"{manifest['quantized_weights']} quantized weights, scales included", file=sys.stderr)
