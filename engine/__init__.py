"""qdllm.engine: native dLLM models, checkpoint loading, the batched denoising engine and the `LLM` API."""
from .async_engine import AsyncEngine, EngineError, QueueFullError
from .config import ModelConfig
from .errors import CheckpointError
from .kv_cache import KVPool
from .llm import LLM
from .loader import load_model, read_config
from .model import DiffusionLM
from .output import Detokenizer, RequestOutput, RequestStats, TokenLogprob
from .sampling import SamplingParams
from .scheduler import EngineCore, EngineStats
from .tokenizer import load_tokenizer

__all__ = ["AsyncEngine", "CheckpointError", "Detokenizer", "DiffusionLM", "EngineCore", "EngineError",
           "EngineStats", "KVPool", "LLM", "ModelConfig", "QueueFullError", "RequestOutput", "RequestStats",
           "SamplingParams", "TokenLogprob", "load_model", "load_tokenizer", "read_config"]
