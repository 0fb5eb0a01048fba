"""qdllm.engine: native dLLM models, checkpoint loading, the block denoiser and the `LLM` API."""
from .config import ModelConfig
from .errors import CheckpointError
from .generate import denoise
from .kv_cache import KVCache
from .llm import LLM, RequestOutput
from .loader import load_model, read_config
from .model import DiffusionLM
from .sampling import SamplingParams
from .tokenizer import load_tokenizer

__all__ = ["CheckpointError", "DiffusionLM", "KVCache", "LLM", "ModelConfig", "RequestOutput",
           "SamplingParams", "denoise", "load_model", "load_tokenizer", "read_config"]
