"""The shared decoder of LLaDA and Dream, in plain torch.

Every linear is an attribute holding a module with nn.Linear's call signature, so the quantizer can
swap dense, fake-quantized and packed layers without touching this file.
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qdllm.kernels.dispatch import use_triton

from .config import ModelConfig
from .kv_cache import CacheView


def at_least_fp32(dtype: torch.dtype) -> torch.dtype:
    """The dtype the references upcast half precision to; a float64 model is not rounded down to it."""
    return torch.promote_types(dtype, torch.float32)


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    # Normalise in fp32 (float64 stays float64) and scale in the activation dtype, as both reference models do.
    xf = x.to(at_least_fp32(x.dtype))
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def add_rms_norm(x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """The residual stream x + residual, and the next sublayer's input."""
    x = x + residual
    return x, rms_norm(x, weight, eps)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.weight, self.eps)


def rope_tables(positions: Tensor, head_dim: int, theta: float) -> tuple[Tensor, Tensor]:
    """cos/sin [B, L, 1, head_dim] in fp32 for explicit positions, so a cache can feed any window."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    freqs = positions.float()[..., None] * inv_freq
    angles = torch.cat((freqs, freqs), dim=-1)[:, :, None, :]
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor, fp32: bool) -> Tensor:
    """Rotate-half RoPE on [B, L, H, D]; LLaDA rotates in fp32, Dream in the activation dtype."""
    xr = x.to(at_least_fp32(x.dtype)) if fp32 else x
    cos, sin = cos.to(xr.dtype), sin.to(xr.dtype)
    x1, x2 = xr.chunk(2, dim=-1)
    return (xr * cos + torch.cat((-x2, x1), dim=-1) * sin).to(x.dtype)


def silu_mul(gate: Tensor, up: Tensor) -> Tensor:
    return F.silu(gate) * up


@dataclass(frozen=True)
class LayerOps:
    """A layer's elementwise steps: torch's (the functions above, the reference numerics, and the CPU path) or
    the Triton kernels' (kernels/elementwise.py, one kernel a step where torch launches up to nine)."""

    rms_norm: Callable[[Tensor, Tensor, float], Tensor]
    add_rms_norm: Callable[[Tensor, Tensor, Tensor, float], tuple[Tensor, Tensor]]
    rope: Callable[[Tensor, Tensor, Tensor, bool], Tensor]
    silu_mul: Callable[[Tensor, Tensor], Tensor]


TORCH_OPS = LayerOps(rms_norm, add_rms_norm, apply_rope, silu_mul)


@functools.cache
def triton_ops() -> LayerOps:
    from qdllm.kernels import elementwise as k  # imports Triton: only once a forward asks for it

    return LayerOps(k.rms_norm, k.add_rms_norm, k.rope, k.silu_mul)


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
    """Bidirectional attention of q [B, L, H, D] over k, v [B, S, Hkv, D] -> [B, L, H * D].

    With grouped K/V heads (Dream) and a key mask, torch's flash kernel refuses the mask and its memory-efficient
    kernel the grouped heads, so `enable_gqa` falls back to the math kernel, which holds [B, H, L, S] scores
    (cuDNN's, where torch prefers it, is the exception). On CUDA the query heads that share a K/V head are read
    as extra query rows instead: plain attention over Hkv heads, which the memory-efficient kernel takes. The
    CPU keeps `enable_gqa` and the numerics the tests pin."""
    B, L, H, D = q.shape
    groups = H // k.shape[2]
    k, v = k.transpose(1, 2), v.transpose(1, 2)
    if groups == 1 or not q.is_cuda:
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k, v, attn_mask=mask, enable_gqa=groups > 1)
        return out.transpose(1, 2).reshape(B, L, H * D)
    return fold_groups(q, k, v, mask)


def fold_groups(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
    """`attention` with query head h = j * groups + i read as row i * L + l of K/V head j (as `enable_gqa` pairs
    them); k, v are [B, Hkv, S, D]."""
    B, L, H, D = q.shape
    hkv = k.shape[1]
    q = q.view(B, L, hkv, H // hkv, D).permute(0, 2, 3, 1, 4).reshape(B, hkv, H // hkv * L, D)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return out.view(B, hkv, H // hkv, L, D).permute(0, 3, 1, 2, 4).reshape(B, L, H * D)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, hd = cfg.d_model, cfg.head_dim
        self.cfg = cfg
        self.attn_norm = RMSNorm(d, cfg.norm_eps)
        self.q_proj = nn.Linear(d, cfg.n_heads * hd, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(d, cfg.n_kv_heads * hd, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(d, cfg.n_kv_heads * hd, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.n_heads * hd, d, bias=cfg.bias)
        self.mlp_norm = RMSNorm(d, cfg.norm_eps)
        self.gate_proj = nn.Linear(d, cfg.mlp_hidden, bias=cfg.bias)
        self.up_proj = nn.Linear(d, cfg.mlp_hidden, bias=cfg.bias)
        self.down_proj = nn.Linear(cfg.mlp_hidden, d, bias=cfg.bias)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, key_mask: Tensor | None,
                cache: CacheView | None, layer: int, ops: LayerOps = TORCH_OPS) -> Tensor:
        cfg, (B, L, _) = self.cfg, x.shape
        h = ops.rms_norm(x, self.attn_norm.weight, self.attn_norm.eps)
        q = ops.rope(self.q_proj(h).view(B, L, cfg.n_heads, cfg.head_dim), cos, sin, cfg.rope_fp32)
        k = ops.rope(self.k_proj(h).view(B, L, cfg.n_kv_heads, cfg.head_dim), cos, sin, cfg.rope_fp32)
        v = self.v_proj(h).view(B, L, cfg.n_kv_heads, cfg.head_dim)
        if cache is not None:
            k, v = cache.update(layer, k, v)
        x, h = ops.add_rms_norm(x, self.o_proj(attention(q, k, v, key_mask)), self.mlp_norm.weight, self.mlp_norm.eps)
        return x + self.down_proj(ops.silu_mul(self.gate_proj(h), self.up_proj(h)))


class DiffusionLM(nn.Module):
    """Bidirectional decoder that returns logits only where they are asked for.

    `backend` ("auto", "torch" or "triton", as for packed linears) picks the elementwise steps' kernels: "auto"
    runs Triton's on CUDA in float16/bfloat16, torch's elsewhere."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.backend = "auto"
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        if not cfg.tie_embeddings:
            self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)

    def forward(self, input_ids: Tensor, positions: Tensor | None = None, key_mask: Tensor | None = None,
                cache: CacheView | None = None, logits_at: Tensor | None = None) -> Tensor:
        """Logits [B, n, V] for the fed tokens `input_ids` [B, L].

        positions: [B, L] RoPE positions (default 0..L-1).
        key_mask:  [B, S] bool, True for keys that take part; S = L, or the cache's read length.
        cache:     stores the fed tokens' K/V and says which K/V attention reads (kv_cache.py).
        logits_at: [B, n] indices into the L fed tokens (default: all). The logits at index j always
                   predict token j; for Dream they are read from hidden state j-1 (j=0 reads itself),
                   so a window that does not start at position 0 must include the token before it.
        """
        cfg, (B, L) = self.config, input_ids.shape
        if positions is None:
            positions = torch.arange(L, device=input_ids.device).expand(B, L)
        cos, sin = rope_tables(positions, cfg.head_dim, cfg.rope_theta)
        mask = None if key_mask is None else key_mask[:, None, None, :]
        x = self.embed(input_ids)
        if cfg.emb_scale != 1.0:
            x = x * cfg.emb_scale
        ops = triton_ops() if use_triton(x, self.backend) else TORCH_OPS
        if x.is_cuda and x.device.index != torch.cuda.current_device():
            with torch.cuda.device(x.device):  # Triton launches on the current device, not the tensors'
                return self._layers(x, cos, sin, mask, cache, logits_at, ops)
        return self._layers(x, cos, sin, mask, cache, logits_at, ops)

    def _layers(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None, cache: CacheView | None,
                logits_at: Tensor | None, ops: LayerOps) -> Tensor:
        cfg, (B, L, _) = self.config, x.shape
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, mask, cache, i, ops)
        if cfg.shift_logits:
            idx = torch.arange(L, device=x.device).expand(B, L) if logits_at is None else logits_at
            logits_at = (idx - 1).clamp(min=0)
        if logits_at is not None:
            x = x.gather(1, logits_at[..., None].expand(-1, -1, x.shape[-1]))
        x = ops.rms_norm(x, self.norm.weight, self.norm.eps)
        logits = F.linear(x, self.embed.weight) if cfg.tie_embeddings else self.lm_head(x)
        return logits * cfg.logit_scale if cfg.logit_scale != 1.0 else logits
