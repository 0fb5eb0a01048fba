"""Tiny random LLaDA and Dream checkpoints in real Hugging Face layout, for tests.

Config keys and tensor names are written out by hand from the real checkpoints, independently of the
engine's own name maps, so that loading them tests those maps.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

VOCAB = 128
MASK, EOS, PAD, UNK = 126, 125, 124, 123
CHAT_TEMPLATE = (
    "{% for m in messages %}<|start_header_id|> {{ m['role'] }} <|end_header_id|> {{ m['content'] }} <|eot_id|> "
    "{% endfor %}{% if add_generation_prompt %}<|start_header_id|> assistant <|end_header_id|>{% endif %}"
)
SPECIAL = {MASK: "<|mdm_mask|>", EOS: "<|endoftext|>", PAD: "<|pad|>", UNK: "<unk>", 122: "<|eot_id|>",
           121: "<|start_header_id|>", 120: "<|end_header_id|>"}
WORDS = [SPECIAL.get(i, f"w{i}") for i in range(VOCAB)]

LLADA_CONFIG = {
    "model_type": "llada", "architectures": ["LLaDAModelLM"], "d_model": 64, "n_layers": 2, "n_heads": 4,
    "n_kv_heads": 4, "mlp_hidden_size": 96, "mlp_ratio": 4, "vocab_size": VOCAB, "embedding_size": VOCAB,
    "mask_token_id": MASK, "eos_token_id": EOS, "pad_token_id": PAD, "max_sequence_length": 256,
    "rope_theta": 500000.0, "rms_norm_eps": 1e-5, "weight_tying": False, "include_bias": False,
    "include_qkv_bias": False, "block_type": "llama", "activation_type": "silu", "layer_norm_type": "rms",
    "rope": True, "rope_full_precision": True, "scale_logits": False, "alibi": False, "flash_attention": False,
    "attention_layer_norm": False, "input_emb_norm": False, "multi_query_attention": None,
    "layer_norm_with_affine": True, "bias_for_layer_norm": False, "clip_qkv": None,
}
DREAM_CONFIG = {
    "model_type": "Dream", "architectures": ["DreamModel"], "hidden_size": 64, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 96, "vocab_size": VOCAB,
    "mask_token_id": MASK, "pad_token_id": EOS, "eos_token_id": EOS, "bos_token_id": 119,
    "rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
    "max_position_embeddings": 256, "hidden_act": "silu", "rope_scaling": None, "use_sliding_window": False,
}


def llada_tensors(cfg: dict, gen: torch.Generator) -> dict[str, torch.Tensor]:
    d, h, V = cfg["d_model"], cfg["mlp_hidden_size"], cfg["embedding_size"]
    kv = cfg["n_kv_heads"] * d // cfg["n_heads"]
    t = {"model.transformer.wte.weight": _randn((V, d), 1.0, gen),
         "model.transformer.ln_f.weight": _norm(d, gen)}
    if not cfg["weight_tying"]:
        t["model.transformer.ff_out.weight"] = _randn((V, d), 3 / d**0.5, gen)
    for i in range(cfg["n_layers"]):
        p = f"model.transformer.blocks.{i}."
        shapes = {"q_proj": (d, d), "k_proj": (kv, d), "v_proj": (kv, d), "attn_out": (d, d),
                  "ff_proj": (h, d), "up_proj": (h, d), "ff_out": (d, h)}
        for name, shape in shapes.items():
            t[p + name + ".weight"] = _randn(shape, 1 / shape[1] ** 0.5, gen)
        t[p + "attn_norm.weight"], t[p + "ff_norm.weight"] = _norm(d, gen), _norm(d, gen)
    return t


def dream_tensors(cfg: dict, gen: torch.Generator) -> dict[str, torch.Tensor]:
    d, h, V = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    kv = cfg["num_key_value_heads"] * d // cfg["num_attention_heads"]
    t = {"model.embed_tokens.weight": _randn((V, d), 1.0, gen), "model.norm.weight": _norm(d, gen),
         "lm_head.weight": _randn((V, d), 3 / d**0.5, gen)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        for name, shape in {"q_proj": (d, d), "k_proj": (kv, d), "v_proj": (kv, d), "o_proj": (d, d)}.items():
            t[p + f"self_attn.{name}.weight"] = _randn(shape, 1 / d**0.5, gen)
            if name != "o_proj":
                t[p + f"self_attn.{name}.bias"] = _randn(shape[:1], 0.1, gen)
        for name, shape in {"gate_proj": (h, d), "up_proj": (h, d), "down_proj": (d, h)}.items():
            t[p + f"mlp.{name}.weight"] = _randn(shape, 1 / shape[1] ** 0.5, gen)
        t[p + "input_layernorm.weight"], t[p + "post_attention_layernorm.weight"] = _norm(d, gen), _norm(d, gen)
    return t


def _randn(shape: tuple, std: float, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(shape, generator=gen) * std


def _norm(d: int, gen: torch.Generator) -> torch.Tensor:
    return 1 + 0.2 * torch.randn(d, generator=gen)


def write_tokenizer(path: Path, chat_template: bool = True) -> None:
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token=SPECIAL[EOS],
                                   pad_token=SPECIAL[PAD], mask_token=SPECIAL[MASK],
                                   additional_special_tokens=[SPECIAL[i] for i in (122, 121, 120)])
    if chat_template:
        fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(path))


def write_checkpoint(path: Path, family: str = "llada", dtype: torch.dtype = torch.float32, shards: int = 1,
                     seed: int = 0, tokenizer: bool = True, **overrides) -> Path:
    """Write config.json, safetensors weights (sharded with an index when shards > 1) and a tokenizer."""
    path.mkdir(parents=True, exist_ok=True)
    cfg = {**(LLADA_CONFIG if family == "llada" else DREAM_CONFIG), **overrides,
           "torch_dtype": str(dtype).removeprefix("torch.")}
    gen = torch.Generator().manual_seed(seed)
    tensors = (llada_tensors if family == "llada" else dream_tensors)(cfg, gen)
    tensors = {k: v.to(dtype).contiguous() for k, v in tensors.items()}
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    names = sorted(tensors)
    if shards == 1:
        save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for s in range(shards):
            file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
            part = {n: tensors[n] for n in names[s::shards]}
            save_file(part, str(path / file), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(part, file))
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
                 "weight_map": weight_map}
        (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    if tokenizer:
        write_tokenizer(path)
    return path
