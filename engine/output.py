"""What a request returns: the canvas cut at max_tokens, EOS and stop strings, as text that only grows.

Blocks finish left to right and committed tokens never change, so each finished block extends the
answer. The text streamed so far holds back what a later block could still change: an unfinished
UTF-8 character (decoded as U+FFFD) and a tail that could be the start of a stop string.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from transformers import PreTrainedTokenizerBase

from .sampling import SamplingParams

REPLACEMENT = "\ufffd"


@dataclass
class RequestStats:
    """Wall-clock times (time.perf_counter) of a request's life, and what it cost."""

    arrival: float = field(default_factory=time.perf_counter)
    scheduled: float | None = None
    first_block: float | None = None
    finished: float | None = None

    @property
    def queue_s(self) -> float | None:
        return None if self.scheduled is None else self.scheduled - self.arrival

    @property
    def first_block_s(self) -> float | None:
        """Time from arrival to the first finished block: the time to the first streamed text."""
        return None if self.first_block is None else self.first_block - self.arrival

    @property
    def latency_s(self) -> float | None:
        return None if self.finished is None else self.finished - self.arrival


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token's log-probability at the step that committed it, and the most likely tokens there."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...]  # (token id, logprob), most likely first


@dataclass
class RequestOutput:
    """The answer so far (`token_ids`, `text`) and what the latest finished block added (`delta_*`)."""

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    delta_token_ids: list[int]
    delta_text: str
    finished: bool
    finish_reason: str | None  # "stop" (EOS or a stop string), "length", "abort" or "error"; None until finished
    nfe: int  # network evaluations spent; a CFG step counts two
    stats: RequestStats
    logprobs: list[TokenLogprob] | None = None  # one per token of token_ids, when SamplingParams.logprobs asks
    error: str | None = None  # why the request could not run, with finish_reason "error"

    @property
    def tokens_per_s(self) -> float | None:
        """Generated tokens over the time from scheduling to the end (the prompt is never counted)."""
        s = self.stats
        if s.finished is None or s.scheduled is None or s.finished <= s.scheduled:
            return None
        return len(self.token_ids) / (s.finished - s.scheduled)


class Detokenizer:
    """Turns generated canvases into answers; without a tokenizer, answers are token ids only."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase | None, eos_ids: frozenset[int]):
        self.tokenizer, self.eos_ids = tokenizer, eos_ids

    def decode(self, tokens: list[int]) -> str:
        if self.tokenizer is None:
            return ""
        return self.tokenizer.decode(tokens, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def cut(self, canvas: list[int], params: SamplingParams) -> tuple[list[int], str, str | None]:
        """Cut the canvas to max_tokens, then at the first EOS, then before the first stop string.
        The reason is "stop" when EOS or a stop string cut it, else None."""
        tokens, reason = canvas[: params.max_tokens], None
        if not params.ignore_eos:
            at = next((i for i, t in enumerate(tokens) if t in self.eos_ids), None)
            if at is not None:
                tokens, reason = tokens[:at], "stop"
        text = self.decode(tokens)
        hits = [text.find(s) for s in params.stop if s in text]
        if hits:
            # the shortest token prefix whose text holds a stop string, and the text before it
            n = next(n for n in range(1, len(tokens) + 1) if any(s in self.decode(tokens[:n]) for s in params.stop))
            tokens, text, reason = tokens[:n], text[: min(hits)], "stop"
        return tokens, text, reason

    @staticmethod
    def stable(text: str, params: SamplingParams) -> str:
        """The part of an unfinished answer's text that no later block can change."""
        text = text.rstrip(REPLACEMENT)
        held = max((n for s in params.stop for n in range(1, len(s)) if text.endswith(s[:n])), default=0)
        return text[: len(text) - held]
