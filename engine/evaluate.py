"""`qdllm-eval`: the masked-diffusion NLL upper bound and perplexity bound of a model on a text file.

For a window x of L tokens the bound is  -log p(x) <= E_l[(L/l) Σ_{i masked} -log p(x_i | x with l masked)],
with l uniform on 1..L and the l masked positions uniform. It is estimated as LLaDA's
`get_log_likelihood.py` does: the mask counts of the Monte Carlo samples are stratified over 1..L from one
random offset, and each sample masks that many positions chosen at random.
Masks come from a generator seeded per (seed, window), so two models evaluated with the same seed see the
same masks: their difference has far less noise than either figure.
The result is JSON, which has no infinity: above about 709 nats/token exp(NLL) exceeds a float64, and
`ppl_bound` and `ppl_stderr` are null beside the finite `nll_per_token`.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NoReturn

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .artifact import sha256_file
from .corpus import DataError, read_texts, token_stream
from .errors import SEED_MAX, ArgumentParser, bounded
from .loader import BACKENDS, load_model, resolve_device
from .model import DiffusionLM
from .tokenizer import check_vocab, load_tokenizer


def mask_counts(L: int, mc: int, gen: torch.Generator) -> torch.Tensor:
    """Stratified mask counts in 1..L: mc evenly spaced points from a uniform offset in [0, L), wrapped.
    Each count is then exactly uniform. (LLaDA starts at a random integer and rounds half to even, which
    favours even counts whenever L/mc has halves; this floors a continuous offset instead.)"""
    u = torch.rand((), generator=gen, dtype=torch.float64) * L
    points = u + torch.arange(mc, dtype=torch.float64) * (L / mc)
    return points.floor().long() % L + 1


def random_masks(counts: torch.Tensor, L: int, gen: torch.Generator) -> torch.Tensor:
    """[mc, L] bool: row j masks counts[j] positions, chosen uniformly."""
    order = torch.rand(len(counts), L, generator=gen).argsort(dim=1)
    return order < counts[:, None]


@torch.no_grad()
def windows_nll(model: DiffusionLM, xs: torch.Tensor, mc: int, gens: list[torch.Generator],
                batch_size: int) -> torch.Tensor:
    """Monte Carlo samples of the bound on -log p(window), in nats, for equal-length windows xs [W, L], one
    generator each: float64 [W, mc]. The W·mc masked copies go through the model batch_size rows at a
    time, so a small mc still fills a batch."""
    W, L = xs.shape
    device = next(model.parameters()).device
    rows = min(batch_size, W * mc)
    # the cross entropy holds the logits in float64 and their float64 log-softmax at once: a forward that needs
    # more than the device has fails for certain, so say so now, not through the OOM killer hours in
    need, have = rows * L * model.config.vocab_size * 16, device_memory(device)
    if need > have:
        raise MemoryError(f"the float64 cross entropy of one forward of {rows} samples needs {need / 1e9:,.1f} GB, "
                          f"and the {device.type} has {have / 1e9:,.1f} GB")
    counts = [mask_counts(L, mc, g) for g in gens]
    masks = torch.cat([random_masks(c, L, g) for c, g in zip(counts, gens)])
    counts = torch.cat(counts)
    targets = xs.to(device).repeat_interleave(mc, dim=0)
    samples = torch.empty(W * mc, dtype=torch.float64)
    for lo in range(0, W * mc, batch_size):
        m, x = masks[lo:lo + batch_size].to(device), targets[lo:lo + batch_size]
        logits = model(torch.where(m, model.config.mask_token_id, x))
        ce = F.cross_entropy(logits.double().transpose(1, 2), x, reduction="none")
        batch = (ce * m).sum(1) * L / counts[lo:lo + len(m)].to(device)
        if not batch.isfinite().all():  # finite logits give a finite float64 CE, so these were NaN or inf
            raise FloatingPointError("the model's logits are NaN or inf")
        samples[lo:lo + len(m)] = batch.cpu()
    return samples.view(W, mc)


def device_memory(device: torch.device) -> int:
    """All the memory of `device`, in bytes: a forward that needs more fails for certain."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def windows(ids: list[int], seqlen: int) -> list[torch.Tensor]:
    """Consecutive windows of `seqlen` tokens; the last one may be shorter. Every token is scored once."""
    return [torch.tensor(ids[i:i + seqlen]) for i in range(0, len(ids), seqlen)]


@dataclass
class Result:
    model: str
    data: str
    data_sha256: str
    tokens: int
    windows: int
    seqlen: int
    mc: int
    seed: int
    dtype: str
    device: str
    nll_per_token: float  # nats; an upper bound on the true NLL, up to Monte Carlo error
    nll_stderr: float | None  # Monte Carlo standard error of nll_per_token (None with --mc 1)
    ppl_bound: float | None  # exp(nll_per_token); None where that exceeds a float64 (JSON has no infinity)
    ppl_stderr: float | None  # delta method: ppl_bound * nll_stderr; None where either is None or it overflows
    seconds: float
    estimator: str = "stratified mask counts (LLaDA get_log_likelihood)"


@dataclass
class Estimate:
    """The bound over a token stream, kept per Monte Carlo sample: two models scored with the same seed
    see the same masks, so `difference` can compare them sample by sample."""
    tokens: torch.Tensor   # int64 [windows]
    samples: torch.Tensor  # float64 [windows, mc]: each sample's estimate of its window's bound, nats

    @property
    def windows(self) -> int:
        return len(self.tokens)

    @property
    def nll_per_token(self) -> float:
        return (self.samples.mean(1).sum() / self.tokens.sum()).item()

    @property
    def stderr(self) -> float:
        """Monte Carlo standard error of nll_per_token (iid formula per window: an over-estimate); NaN at mc 1."""
        return _stderr(self.samples, self.tokens)


def _stderr(samples: torch.Tensor, tokens: torch.Tensor) -> float:
    if samples.shape[1] < 2:
        return math.nan
    return (samples.var(dim=1).sum() / samples.shape[1]).sqrt().item() / tokens.sum().item()


def perplexity(nll: float, se: float) -> tuple[float | None, float | None]:
    """exp(nll) and its delta-method standard error; None for a figure that is not a finite float64 (exp
    overflows above about 709 nats, and se is NaN at mc 1), since JSON has no NaN or infinity."""
    try:
        ppl = math.exp(nll)
    except OverflowError:
        return None, None
    return ppl, ppl * se if math.isfinite(ppl * se) else None


def out_of_memory(e: BaseException) -> bool:
    """A CUDA allocation failure, the CPU allocator's (a plain RuntimeError), or `windows_nll`'s refusal."""
    return isinstance(e, (MemoryError, torch.OutOfMemoryError)) or "can't allocate memory" in str(e)


def difference(a: Estimate, b: Estimate) -> tuple[float, float]:
    """(a − b) in NLL per token, and its Monte Carlo standard error from the per-sample differences.
    Both must come from the same token stream, seqlen, mc and seed (so the same masks)."""
    if not torch.equal(a.tokens, b.tokens) or a.samples.shape != b.samples.shape:
        raise ValueError("difference: the estimates come from different windows or mc")
    return a.nll_per_token - b.nll_per_token, _stderr(a.samples - b.samples, a.tokens)


def evaluate(model: DiffusionLM, ids: list[int], seqlen: int, mc: int, seed: int, batch_size: int = 32,
             progress: bool = True) -> Estimate:
    """The bound over a token stream, window by window; window w's masks come from seed and w alone."""
    parts = windows(ids, seqlen)
    full, per_batch = len(ids) // seqlen, max(1, batch_size // mc)  # only the last window may be shorter
    groups = [range(lo, min(lo + per_batch, full)) for lo in range(0, full, per_batch)]
    groups += [[full]] if len(parts) > full else []
    samples = []
    # `with` closes the bar on an error too, so that the error starts a line of its own
    with tqdm(total=len(parts), desc="qdllm-eval", unit="window", disable=not progress) as bar:
        for group in groups:
            gens = [torch.Generator().manual_seed(seed * 1_000_003 + w) for w in group]
            samples.append(windows_nll(model, torch.stack([parts[w] for w in group]), mc, gens, batch_size))
            bar.update(len(group))
    return Estimate(torch.tensor([len(w) for w in parts]), torch.cat(samples))


MAX_MC = 65536  # far beyond any useful estimate; a larger count overflows inside torch


def run(args: argparse.Namespace) -> Result:
    start = time.time()
    if args.mc > MAX_MC:
        raise ValueError(f"--mc must be at most {MAX_MC}, got {args.mc}")
    texts = read_texts(args.data)
    device = resolve_device(args.device, "--device")
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.float32 if device.type == "cpu" else None)
    model = load_model(args.model, device=device, dtype=dtype, backend=args.backend)
    tokenizer = load_tokenizer(args.model)
    cfg = model.config
    check_vocab(tokenizer, cfg.vocab_size, args.model)
    seqlen = args.seqlen or min(cfg.max_seq_len, 1024)
    if seqlen > cfg.max_seq_len:
        raise ValueError(f"--seqlen must be at most the model's max_sequence_length ({cfg.max_seq_len}), "
                         f"got {seqlen}")
    ids = token_stream(tokenizer, texts, cfg.eos_token_ids[0] if cfg.eos_token_ids else None)
    if cfg.mask_token_id in ids:
        raise DataError(f"{args.data}: the text contains the mask token; it cannot be scored")
    try:
        est = evaluate(model, ids, seqlen, args.mc, args.seed, args.batch_size)
    except FloatingPointError as e:
        raise ValueError(f"{e} on {args.data}; check the checkpoint's weights") from None
    except (MemoryError, RuntimeError) as e:
        if not out_of_memory(e):
            raise
        detail = f" ({e})" if isinstance(e, MemoryError) and str(e) else ""
        raise ValueError(f"out of memory with --batch-size {args.batch_size}{detail}; lower --batch-size") from None
    nll, se = est.nll_per_token, est.stderr
    ppl, ppl_se = perplexity(nll, se)
    return Result(model=str(args.model), data=str(args.data),
                  data_sha256=sha256_file(args.data), tokens=len(ids),
                  windows=est.windows, seqlen=seqlen, mc=args.mc, seed=args.seed,
                  dtype=str(next(model.parameters()).dtype).removeprefix("torch."), device=str(device),
                  nll_per_token=nll, nll_stderr=None if math.isnan(se) else se, ppl_bound=ppl, ppl_stderr=ppl_se,
                  seconds=round(time.time() - start, 1))


def parser() -> argparse.ArgumentParser:
    ap = ArgumentParser(prog="qdllm-eval", description="Masked-diffusion NLL bound and perplexity bound "
                                 "of a dLLM checkpoint or qdllm artifact on a text file, printed as JSON. "
                                 "Above about 709 nats/token the perplexity exceeds a float64: ppl_bound and "
                                 "ppl_stderr are then null (JSON has no infinity).")
    ap.add_argument("model", type=Path, help="HF checkpoint directory or qdllm artifact")
    ap.add_argument("--data", type=Path, required=True, help="plain-text file, or .jsonl with a 'text' field")
    ap.add_argument("--mc", type=bounded(int, "--mc", 1), default=128,
                    help="Monte Carlo samples per window (default 128)")
    ap.add_argument("--seed", type=bounded(int, "--seed", 0, SEED_MAX), default=0, help="mask seed (default 0)")
    ap.add_argument("--seqlen", type=bounded(int, "--seqlen", 1), default=None,
                    help="window length in tokens (default: the model's max_sequence_length, at most 1024)")
    ap.add_argument("--batch-size", type=bounded(int, "--batch-size", 1), default=32, help="samples per forward")
    ap.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    ap.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                    help="compute dtype (default: float32 on CPU, the checkpoint's on GPU)")
    ap.add_argument("--backend", choices=BACKENDS, default="auto",
                    help="kernels: auto, torch, triton, or dense (an artifact dequantized at load)")
    ap.add_argument("--json", type=Path, default=None, help="also write the result JSON to this file")
    return ap


def fail(message: object) -> NoReturn:
    """One line and exit status 2, as for argparse's own refusals."""
    print(f"qdllm-eval: error: {message}", file=sys.stderr)
    sys.exit(2)


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    if args.json:  # the cases that can be seen before the run
        if args.json.is_dir():
            fail(f"--json {args.json}: is a directory (expected a file to write)")
        for parent in args.json.parents:
            if parent.exists() and not parent.is_dir():
                fail(f"--json {args.json}: {parent} is a file, not a directory")
        target = args.json.resolve()
        if target == args.data.resolve():
            fail(f"--json {args.json}: is the --data file; writing the result there would destroy it")
        if target.is_relative_to(args.model.resolve()):
            fail(f"--json {args.json}: lies in the model folder {args.model}; writing there could destroy its files")
    try:
        result = run(args)
    except ValueError as e:  # CheckpointError, DataError and bad settings: one line each
        fail(e)
    text = json.dumps(asdict(result), indent=2, allow_nan=False)
    print(text)  # first: a --json file that cannot be written must not lose the result
    se = "" if result.nll_stderr is None else f" ± {result.nll_stderr:.4f}"
    ppl = "inf" if result.ppl_bound is None else f"{result.ppl_bound:.2f}"
    print(f"NLL bound {result.nll_per_token:.4f}{se} nats/token, perplexity bound {ppl} over {result.tokens} tokens",
          file=sys.stderr)
    if args.json:
        try:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(text + "\n")
        except OSError as e:
            fail(f"--json {args.json}: cannot be written ({e.strerror}); the result is printed above")
