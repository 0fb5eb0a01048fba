"""Dream (HKUNLP): a Qwen2 layout with GQA and QKV bias, whose logits are shifted by one position."""
from __future__ import annotations

from ..config import Fields, ModelConfig

MODEL_TYPE = "Dream"
LAYER_PREFIX = "model.layers.{i}."
LAYER = {
    "attn_norm": "input_layernorm", "q_proj": "self_attn.q_proj", "k_proj": "self_attn.k_proj",
    "v_proj": "self_attn.v_proj", "o_proj": "self_attn.o_proj", "mlp_norm": "post_attention_layernorm",
    "gate_proj": "mlp.gate_proj", "up_proj": "mlp.up_proj", "down_proj": "mlp.down_proj",
}
GLOBAL = {"embed": "model.embed_tokens", "norm": "model.norm", "lm_head": "lm_head"}


def parse_config(f: Fields) -> ModelConfig:
    d_model, n_heads = f.int("hidden_size", minimum=1), f.int("num_attention_heads", minimum=1)
    f.check_head_dim("num_attention_heads", "hidden_size")
    n_kv = f.int("num_key_value_heads", n_heads, minimum=1)
    if n_heads % n_kv:
        raise f.fail("num_key_value_heads", f"a divisor of num_attention_heads ({n_heads})")
    if f.raw.get("head_dim") not in (None, d_model // n_heads):
        raise f.fail("head_dim", f"hidden_size / num_attention_heads = {d_model // n_heads}")
    f.choice("hidden_act", ("silu",), "silu")
    f.choice("rope_scaling", (None,), None)
    f.choice("use_sliding_window", (False,), False)
    vocab_size = f.int("vocab_size", minimum=1)
    return ModelConfig(
        family="dream",
        vocab_size=vocab_size,
        d_model=d_model,
        n_layers=f.int("num_hidden_layers", minimum=1),
        n_heads=n_heads,
        n_kv_heads=n_kv,
        mlp_hidden=f.int("intermediate_size", minimum=1),
        rope_theta=f.float("rope_theta", 10000.0),
        norm_eps=f.float("rms_norm_eps", 1e-6),
        mask_token_id=f.token_id("mask_token_id", vocab_size, 151666),
        eos_token_ids=f.token_ids("eos_token_id", vocab_size),
        max_seq_len=f.int("max_position_embeddings", 32768, minimum=1),
        qkv_bias=True,
        tie_embeddings=f.bool("tie_word_embeddings", False),
        rope_fp32=False,
        shift_logits=True,
        torch_dtype=f.dtype(),
    )

