"""LLaDA (ML-GSAI): OLMo-style config keys and `model.transformer.*` tensor names."""
from __future__ import annotations

import math

from ..config import Fields, ModelConfig

MODEL_TYPE = "llada"
LAYER_PREFIX = "model.transformer.blocks.{i}."
# native layer-local module -> LLaDA block-local module
LAYER = {
    "attn_norm": "attn_norm", "q_proj": "q_proj", "k_proj": "k_proj", "v_proj": "v_proj", "o_proj": "attn_out",
    "mlp_norm": "ff_norm", "gate_proj": "ff_proj", "up_proj": "up_proj", "down_proj": "ff_out",
}
GLOBAL = {"embed": "model.transformer.wte", "norm": "model.transformer.ln_f", "lm_head": "model.transformer.ff_out"}


def parse_config(f: Fields) -> ModelConfig:
    d_model, n_heads = f.int("d_model", minimum=1), f.int("n_heads", minimum=1)
    f.check_head_dim("n_heads", "d_model")
    n_kv = 1 if f.bool("multi_query_attention", False) else f.int("n_kv_heads", n_heads, minimum=1)
    if n_heads % n_kv:
        raise f.fail("n_kv_heads", f"a divisor of n_heads ({n_heads})")
    # Options that would change the numerics are refused rather than silently ignored.
    f.choice("block_type", ("llama",))
    f.choice("activation_type", ("silu",))
    f.choice("layer_norm_type", ("rms",), "rms")
    f.choice("layer_norm_with_affine", (True,), True)
    f.choice("bias_for_layer_norm", (False,), False)
    f.choice("rope", (True,), True)
    f.choice("alibi", (False,), False)
    f.choice("attention_layer_norm", (False,), False)
    f.choice("clip_qkv", (None,), None)
    vocab_size = f.int("embedding_size", None, minimum=1) or f.int("vocab_size", minimum=1)
    return ModelConfig(
        family="llada",
        vocab_size=vocab_size,
        d_model=d_model,
        n_layers=f.int("n_layers", minimum=1),
        n_heads=n_heads,
        n_kv_heads=n_kv,
        mlp_hidden=f.int("mlp_hidden_size", None, minimum=1) or f.int("mlp_ratio", 4, minimum=1) * d_model,
        rope_theta=f.float("rope_theta", 10000.0),
        norm_eps=f.float("rms_norm_eps", 1e-5),
        mask_token_id=f.token_id("mask_token_id", vocab_size),
        eos_token_ids=f.token_ids("eos_token_id", vocab_size),
        max_seq_len=f.int("max_sequence_length", 4096, minimum=1),
        qkv_bias=f.bool("include_bias", False) or f.bool("include_qkv_bias", False),
        bias=f.bool("include_bias", False),
        tie_embeddings=f.bool("weight_tying", False),
        rope_fp32=f.bool("rope_full_precision", True),
        emb_scale=math.sqrt(d_model) if f.bool("input_emb_norm", False) else 1.0,
        logit_scale=1 / math.sqrt(d_model) if f.bool("scale_logits", False) else 1.0,
        torch_dtype=f.dtype(),
    )

