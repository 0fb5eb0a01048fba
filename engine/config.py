"""The one architecture description that every model family is parsed into."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .errors import CheckpointError


@dataclass(frozen=True)
class ModelConfig:
    """Both families are the same decoder: bidirectional attention, rotate-half RoPE, RMSNorm, SwiGLU."""

    family: str  # "llada" or "dream": picks the tensor names and sampler defaults
    vocab_size: int  # rows of the embedding and of the LM head (LLaDA's embedding_size)
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    mlp_hidden: int
    rope_theta: float
    norm_eps: float
    mask_token_id: int
    eos_token_ids: tuple[int, ...]
    max_seq_len: int
    qkv_bias: bool = False  # bias on q/k/v (Dream, LLaDA include_qkv_bias)
    bias: bool = False  # bias on every linear (LLaDA include_bias)
    tie_embeddings: bool = False
    rope_fp32: bool = True  # LLaDA rotates in fp32; Dream rotates in the activation dtype
    shift_logits: bool = False  # Dream: position i is predicted from hidden state i-1
    emb_scale: float = 1.0  # LLaDA input_emb_norm multiplies embeddings by sqrt(d_model)
    logit_scale: float = 1.0  # LLaDA scale_logits multiplies logits by 1/sqrt(d_model)
    torch_dtype: torch.dtype | None = None  # the dtype the checkpoint declares, if any

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


_REQUIRED = object()
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class Fields:
    """Typed reads from a raw config.json; every failure is one line naming the file and the key."""

    def __init__(self, raw: dict, path: str):
        self.raw, self.path = raw, path

    def fail(self, key: str, expected: str) -> CheckpointError:
        return CheckpointError(f"{self.path}: field '{key}' must be {expected}, got {self.raw.get(key)!r}")

    def _get(self, key: str, default: object, ok, expected: str):
        if key not in self.raw or self.raw[key] is None:
            if default is _REQUIRED:
                raise CheckpointError(f"{self.path}: required field '{key}' is missing ({expected})")
            return default
        value = self.raw[key]
        if not ok(value):
            raise self.fail(key, expected)
        return value

    def int(self, key: str, default: object = _REQUIRED, minimum: int = 0) -> int:
        return self._get(key, default, lambda v: type(v) is int and v >= minimum, f"an integer >= {minimum}")

    def token_id(self, key: str, vocab_size: int, default: object = _REQUIRED) -> int:
        """A token id must index the embedding, or every forward that meets it fails deep inside torch."""
        ok = lambda v: type(v) is int and 0 <= v < vocab_size
        if default is not _REQUIRED and not ok(default):
            default = _REQUIRED  # the family's default id does not fit this vocabulary
        return self._get(key, default, ok, f"a token id in [0, {vocab_size})")

    def float(self, key: str, default: object = _REQUIRED) -> float:
        ok = lambda v: type(v) in (int, float) and 0 < v < math.inf
        return float(self._get(key, default, ok, "a positive finite number"))

    def bool(self, key: str, default: object = _REQUIRED) -> bool:
        return self._get(key, default, lambda v: type(v) is bool, "true or false")

    def choice(self, key: str, allowed: tuple, default: object = _REQUIRED):
        """Options that change the numerics and that qdllm does not implement are refused, not ignored."""
        return self._get(key, default, lambda v: v in allowed, f"one of {list(allowed)} (qdllm supports only these)")

    def token_ids(self, key: str, vocab_size: int) -> tuple[int, ...]:
        ok_id = lambda i: type(i) is int and 0 <= i < vocab_size
        ok = lambda v: ok_id(v) or (isinstance(v, list) and all(ok_id(i) for i in v))
        value = self._get(key, (), ok, f"a token id or a list of token ids in [0, {vocab_size})")
        return tuple(value) if isinstance(value, (list, tuple)) else (value,)

    def dtype(self) -> torch.dtype | None:
        """The declared dtype picks the default compute dtype, so an unknown one is refused, not ignored."""
        key = "torch_dtype" if "torch_dtype" in self.raw else "dtype"
        name = self._get(key, None, lambda v: isinstance(v, str) and v in _DTYPES, f"one of {list(_DTYPES)}")
        return None if name is None else _DTYPES[name]

    def check_head_dim(self, heads: str, width: str) -> None:
        """The width must split into heads of an even size: rotary embeddings rotate pairs of dimensions."""
        if self.raw[width] % self.raw[heads]:
            raise CheckpointError(f"{self.path}: field '{width}' ({self.raw[width]}) must be a multiple "
                                  f"of '{heads}' ({self.raw[heads]})")
        if self.raw[width] // self.raw[heads] % 2:
            raise CheckpointError(f"{self.path}: field '{width}' / '{heads}' (the head size, "
                                  f"{self.raw[width] // self.raw[heads]}) must be even for rotary embeddings")
