"""The offline Python API: `LLM(path).generate(prompts, params)`."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from .loader import load_model, model_path, resolve_device
from .output import Detokenizer, RequestOutput
from .sampling import SamplingParams
from .scheduler import EngineCore
from .tokenizer import chat_prompt, check_vocab, end_token_ids, load_tokenizer

Prompt = str | list[int]


class LLM:
    """Batches the prompts of each call through the same engine core that serves HTTP requests."""

    def __init__(self, path: str | Path, device: str | torch.device | None = None, backend: str = "auto",
                 dtype: torch.dtype | None = None, max_num_seqs: int = 8, max_batch_tokens: int = 16384,
                 max_model_len: int | None = None, cuda_graphs: bool | None = None, kv_cache_memory: int | None = None,
                 chat_template: str | Path | None = None):
        path, device = model_path(path), resolve_device(device)
        if cuda_graphs and device.type != "cuda":  # refused before the weights load
            raise ValueError(f"cuda_graphs needs a CUDA device, got {device}")
        self.tokenizer = load_tokenizer(path, chat_template)  # before the weights, which can take minutes
        self.model = load_model(path, device=device, dtype=dtype, backend=backend)
        check_vocab(self.tokenizer, self.model.config.vocab_size, path)
        self.eos_ids = end_token_ids(self.tokenizer, self.model.config.eos_token_ids)
        self.engine = EngineCore(self.model, Detokenizer(self.tokenizer, self.eos_ids), max_num_seqs=max_num_seqs,
                                 max_batch_tokens=max_batch_tokens, max_model_len=max_model_len,
                                 cuda_graphs=cuda_graphs, kv_cache_memory=kv_cache_memory)

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 params: SamplingParams | Sequence[SamplingParams] | None = None,
                 suffix: Prompt | None = None) -> list[RequestOutput]:
        """One output per prompt; a prompt is a string or a list of token ids. With a `suffix` (the same kinds),
        each output fills in the text between its prompt and the suffix."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and all(type(t) is int for t in prompts)):
            prompts = [prompts]
        if not isinstance(prompts, (list, tuple)) or not all(isinstance(p, (str, list)) for p in prompts):
            raise TypeError(f"prompts must be a string, a list of token ids, or a list of those, got {_show(prompts)}")
        if isinstance(suffix, str):
            suffix = self.tokenizer(suffix, add_special_tokens=False)["input_ids"]
        return self._run_all([self._encode(p) for p in prompts], params, suffix)

    def chat(self, conversations: list[dict[str, str]] | Sequence[list[dict[str, str]]],
             params: SamplingParams | Sequence[SamplingParams] | None = None) -> list[RequestOutput]:
        """Like generate, for conversations of {"role", "content"} messages, through the chat template."""
        if isinstance(conversations, list) and conversations and isinstance(conversations[0], dict):
            conversations = [conversations]
        if not isinstance(conversations, (list, tuple)):
            raise TypeError(f"conversations must be a list of messages, or a list of those, got {_show(conversations)}")
        for i, c in enumerate(conversations):
            check_conversation(c, i)
        return self._run_all([chat_prompt(self.tokenizer, c) for c in conversations], params)

    def _encode(self, prompt: Prompt) -> list[int]:
        return self.tokenizer(prompt)["input_ids"] if isinstance(prompt, str) else prompt

    def _run_all(self, prompts: list[list[int]], params: SamplingParams | Sequence[SamplingParams] | None,
                 suffix: list[int] | None = None) -> list[RequestOutput]:
        if params is None or isinstance(params, SamplingParams):
            params = [params or SamplingParams()] * len(prompts)
        if not isinstance(params, (list, tuple)) or not all(isinstance(p, SamplingParams) for p in params):
            raise TypeError(f"params must be a SamplingParams or a list of them, one per prompt, got {_show(params)}")
        if len(params) != len(prompts):
            raise ValueError(f"got {len(params)} SamplingParams for {len(prompts)} prompts")
        for p, s in zip(prompts, params):  # refuse a bad request before any work starts
            self.engine.check(p, s, suffix)
        ids = [self.engine.add_request(p, s, suffix=suffix) for p, s in zip(prompts, params)]
        final: dict[str, RequestOutput] = {}
        try:
            while len(final) < len(ids):
                final.update((o.request_id, o) for o in self.engine.step() if o.finished)
        finally:  # a failed or interrupted call leaves nothing behind to run in the next one
            self.engine.clear()
        return [final[i] for i in ids]


def check_conversation(messages: object, i: int) -> None:
    """What the server's schema checks of a request's messages; a chat template would fail on less, or quietly
    render a message without its role."""
    if not isinstance(messages, list) or not messages:
        raise TypeError(f"conversation {i} must be a non-empty list of messages, got {_show(messages)}")
    for j, m in enumerate(messages):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise TypeError(f"conversation {i}, message {j}: expected a dict with string 'role' and 'content', "
                            f"got {_show(m)}")


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
