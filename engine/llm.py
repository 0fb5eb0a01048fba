"""The offline Python API: `LLM(path).generate(prompts, params)`."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .generate import denoise
from .loader import load_model, resolve_device
from .sampling import SamplingParams
from .tokenizer import chat_prompt, end_token_ids, load_tokenizer

Prompt = str | list[int]


@dataclass
class RequestOutput:
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str  # "stop" (EOS or a stop string) or "length"
    nfe: int  # network evaluations spent


class LLM:
    def __init__(self, path: str | Path, device: str | torch.device | None = None, backend: str = "auto",
                 dtype: torch.dtype | None = None):
        self.model = load_model(path, device=resolve_device(device), dtype=dtype, backend=backend)
        self.tokenizer = load_tokenizer(path)
        self.eos_ids = end_token_ids(self.tokenizer, self.model.config.eos_token_ids)

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 params: SamplingParams | Sequence[SamplingParams] | None = None) -> list[RequestOutput]:
        """One output per prompt; a prompt is a string or a list of token ids."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and all(type(t) is int for t in prompts)):
            prompts = [prompts]
        return self._run_all([self._encode(p) for p in prompts], params)

    def chat(self, conversations: list[dict[str, str]] | Sequence[list[dict[str, str]]],
             params: SamplingParams | Sequence[SamplingParams] | None = None) -> list[RequestOutput]:
        """Like generate, for conversations of {"role", "content"} messages, through the chat template."""
        if conversations and isinstance(conversations[0], dict):
            conversations = [conversations]
        return self._run_all([chat_prompt(self.tokenizer, c) for c in conversations], params)

    def _encode(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer(prompt)["input_ids"]
        vocab = self.model.config.vocab_size
        if not isinstance(prompt, list) or not all(type(t) is int and 0 <= t < vocab for t in prompt):
            raise ValueError(f"a prompt must be a string or a list of token ids in [0, {vocab})")
        return prompt

    def _run_all(self, prompts: list[list[int]],
                 params: SamplingParams | Sequence[SamplingParams] | None) -> list[RequestOutput]:
        if params is None or isinstance(params, SamplingParams):
            params = [params or SamplingParams()] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"got {len(params)} SamplingParams for {len(prompts)} prompts")
        return [self._run(p, s) for p, s in zip(prompts, params)]

    def _run(self, prompt: list[int], params: SamplingParams) -> RequestOutput:
        if not prompt:
            raise ValueError("a prompt must hold at least one token")
        done = self._finish
        result = denoise(self.model, prompt, params, self.eos_ids,
                         should_stop=(lambda toks: done(toks, params)[2] == "stop") if params.stop else None)
        token_ids, text, reason = done(result.canvas, params)
        return RequestOutput(prompt, token_ids, text, reason, result.nfe)

    def _finish(self, canvas: list[int], params: SamplingParams) -> tuple[list[int], str, str]:
        """Cut the canvas to max_tokens, then at the first EOS, then before the first stop string."""
        tokens, reason = canvas[: params.max_tokens], "length"
        if not params.ignore_eos:
            cut = next((i for i, t in enumerate(tokens) if t in self.eos_ids), None)
            if cut is not None:
                tokens, reason = tokens[:cut], "stop"
        decode = lambda t: self.tokenizer.decode(t, skip_special_tokens=True)  # noqa: E731
        text = decode(tokens)
        hits = [text.find(s) for s in params.stop if s in text]
        if hits:
            # the shortest token prefix whose text holds the stop string, and the text before it
            n = next(n for n in range(1, len(tokens) + 1) if any(s in decode(tokens[:n]) for s in params.stop))
            tokens, text, reason = tokens[:n], text[: min(hits)], "stop"
        return tokens, text, reason
