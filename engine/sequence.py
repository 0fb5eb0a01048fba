"""One request's semi-autoregressive block denoising, as a state machine the scheduler steps.

The scheduler asks each sequence for the window it needs (`window`) and its masked positions (`masked`),
runs batched forwards with logits at those positions only, proposes tokens for all of a forward's sequences
at once (`prepare`, then `remasking.propose`), and has each sequence commit its own (`commit`). The canvas
lives on the host: what a step needs to know of it (which positions are still masked, whether a block is
done) costs no wait on the device. With cache="none" and temperature 0 this is
LLaDA's `generate()` token for token; with block_length >= max_tokens and the timestep schedule it is
Dream's `diffusion_generate`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .config import ModelConfig
from .model import at_least_fp32
from .output import TokenLogprob
from .remasking import select
from .sampling import SamplingParams
from .schedule import commit_count, commit_probability, split_steps

DEFAULT_SCHEDULE = {"llada": "linear", "dream": "timestep"}


def block_layout(params: SamplingParams) -> tuple[int, int]:
    """(block length, number of blocks): the canvas is max_tokens rounded up to whole blocks, and a
    block longer than max_tokens shrinks to it (one global block, as Dream decodes)."""
    block = min(params.block_length, params.max_tokens)
    return block, -(-params.max_tokens // block)  # in integers: a float quotient rounds a huge max_tokens


def footprint(prompt_len: int, params: SamplingParams, suffix_len: int = 0) -> tuple[int, int]:
    """(rows, length): the canvas rows a request feeds per step (CFG adds an unconditional row), and the
    tokens of each row: prompt, canvas, and the suffix an infill ends with."""
    block, n_blocks = block_layout(params)
    return (2 if params.cfg_scale > 0 else 1), prompt_len + block * n_blocks + suffix_len


@dataclass(frozen=True)
class Window:
    """The tokens one step feeds: positions [lo, hi) of the sequence, and the block [start, end) whose
    logits it needs. `full` feeds the whole sequence (no cache, or a cache refresh); otherwise the
    forward attends over the cached K/V of the sequence's first `length` positions."""

    lo: int
    hi: int
    start: int
    end: int
    full: bool


class Sequence:
    """The canvas lies between the prompt and an optional suffix: with one, the request fills in the middle,
    which bidirectional attention lets a dLLM do directly."""

    def __init__(self, prompt: list[int], params: SamplingParams, cfg: ModelConfig, device: torch.device,
                 suffix: list[int] | None = None):
        suffix = suffix or []
        self.params, self.prompt_len = params, len(prompt)
        self.mask = cfg.mask_token_id
        self.shift = int(cfg.shift_logits)  # Dream reads position i from hidden state i-1
        self.block, self.n_blocks = block_layout(params)
        self.rows, self.length = footprint(self.prompt_len, params, len(suffix))
        self.canvas_end = self.length - len(suffix)
        self.x = torch.full((self.length,), self.mask, dtype=torch.long)  # on the host
        self.x[: self.prompt_len] = torch.tensor(prompt, dtype=torch.long)
        self.x[self.canvas_end:] = torch.tensor(suffix, dtype=torch.long)
        self.logprob: Tensor | None = None  # per canvas position, and the alternatives (values, ids), when asked
        if params.logprobs is not None:
            self.logprob = torch.zeros(self.length, dtype=torch.float64, device=device)
            self.top = (torch.zeros(self.length, params.logprobs, dtype=torch.float64, device=device),
                        torch.zeros(self.length, params.logprobs, dtype=torch.long, device=device))
        self.gen = torch.Generator(device)  # draws over the vocabulary (sampling), on the device
        self.gen.manual_seed(params.seed) if params.seed is not None else self.gen.seed()
        # draws over the block's positions, on the host where selection runs: the same generator on a CPU
        self.host_gen = self.gen if self.gen.device.type == "cpu" else torch.Generator().manual_seed(
            self.gen.initial_seed())
        self.rows_for_logprobs: Tensor | None = None  # this step's unadjusted rows, when logprobs are asked for
        self.bias: tuple[Tensor, Tensor] | None = None  # logit_bias's ids and values on the device
        self.schedule = params.schedule or DEFAULT_SCHEDULE[cfg.family]
        self.block_steps = (split_steps(params.steps or self.block * self.n_blocks, self.n_blocks)
                            if not params.parallel else None)  # parallel decoding runs each block until done
        self.nfe = 0
        self.b = -1
        self.next_block()

    @property
    def start(self) -> int:
        return self.prompt_len + self.b * self.block

    @property
    def end(self) -> int:
        return self.start + self.block

    @property
    def generated(self) -> list[int]:
        """Every generated position up to the current block's end."""
        return self.x[self.prompt_len: self.end].tolist()

    @property
    def last_block(self) -> bool:
        return self.b == self.n_blocks - 1

    def inputs(self) -> Tensor:
        """The canvas rows a forward feeds: [rows, length]; the unconditional row masks the prompt and suffix."""
        x = self.x[None]
        if self.rows == 1:
            return x
        uncond = x.clone()
        uncond[:, : self.prompt_len] = self.mask
        uncond[:, self.canvas_end:] = self.mask
        return torch.cat([x, uncond])

    def window(self) -> Window:
        cache = self.params.cache
        if cache == "none" or self.refresh:
            return Window(0, self.length, self.start, self.end, True)
        hi = self.end if cache == "dual" else self.length
        return Window(max(self.start - self.shift, 0), hi, self.start, self.end, False)

    def prepare(self, logits: Tensor) -> Tensor:
        """The logits that `propose` reads, [n, V] on the device, from the forward's logits at the block's masked
        positions [rows, n, V]: CFG combined, penalties and logit bias applied."""
        self.nfe += self.rows
        if self.rows == 2:
            cond, uncond = logits.to(at_least_fp32(logits.dtype))
            logits = uncond + (self.params.cfg_scale + 1) * (cond - uncond)
        else:
            logits = logits[0]
        p = self.params
        if p.logprobs is not None:  # a copy: a CUDA graph's next replay overwrites its logits
            self.rows_for_logprobs = logits.clone()
        if p.presence_penalty or p.frequency_penalty or p.logit_bias:
            logits = self._adjust(logits)
        return logits

    def commit(self, x0: Tensor, conf: Tensor) -> bool:
        """Commit this step's tokens from the proposal for the masked positions (candidates x0 [n] and their
        confidence, on the host); True when the block is finished."""
        p = self.params
        if p.remasking in ("random", "origin"):
            conf = torch.rand(x0.shape, dtype=torch.float64, generator=self.host_gen)
        if p.remasking == "origin" and not p.parallel:
            ratio = commit_probability(self.schedule, self.step, self.steps, self.n_start, self.masked.numel())
            chosen = (torch.rand(self.masked.shape, generator=self.host_gen) < ratio).nonzero()[:, 0]
        else:
            chosen = select(conf, self.count, p.threshold, p.factor, p.alg_temp, self.host_gen)
        positions = self.start + self.masked[chosen]
        self.x[positions] = x0[chosen]
        if self.rows_for_logprobs is not None:
            self._record_logprobs(self.rows_for_logprobs, chosen, x0[chosen], positions)
            self.rows_for_logprobs = None
        self.refresh, self.step = False, self.step + 1
        return self._settle()

    def _adjust(self, logits: Tensor) -> Tensor:
        """OpenAI's presence and frequency penalties, over the tokens this request has committed so far, and its
        logit bias, in float64 as `propose` works."""
        p, logits = self.params, logits.to(torch.float64, copy=True)  # the forward's logits stay as they are
        if p.presence_penalty or p.frequency_penalty:
            generated = self.x[self.prompt_len: self.canvas_end]
            counts = torch.bincount(generated[generated != self.mask], minlength=logits.shape[-1])
            counts = counts.to(logits.device, torch.float64, non_blocking=True)
            logits = logits - p.frequency_penalty * counts - p.presence_penalty * (counts > 0).double()
        if p.logit_bias:
            if self.bias is None:  # copied to the device once
                ids, bias = zip(*p.logit_bias)
                self.bias = (torch.tensor(ids, device=logits.device), torch.tensor(bias, dtype=torch.float64,
                                                                                    device=logits.device))
            logits[:, self.bias[0]] += self.bias[1]
        return logits

    def _record_logprobs(self, rows: Tensor, chosen: Tensor, tokens: Tensor, positions: Tensor) -> None:
        """The committed tokens' log-probabilities, and the most likely tokens, in float64 as `propose` scores,
        kept on the device until an output asks for them."""
        dev = rows.device
        lp = torch.log_softmax(rows[chosen.to(dev, non_blocking=True)].double(), -1)
        positions = positions.to(dev, non_blocking=True)
        self.logprob[positions] = lp.gather(-1, tokens[:, None].to(dev, non_blocking=True))[:, 0]
        if self.params.logprobs:
            top = lp.topk(self.params.logprobs, -1)
            self.top[0][positions], self.top[1][positions] = top.values, top.indices

    def logprobs(self, tokens: list[int]) -> list[TokenLogprob] | None:
        """Those of the generated `tokens` (the canvas as the answer was cut), or None when not asked for."""
        if self.logprob is None:
            return None
        lo, hi = self.prompt_len, self.prompt_len + len(tokens)
        values, ids = self.top[0][lo:hi].tolist(), self.top[1][lo:hi].tolist()
        return [TokenLogprob(t, lp, tuple(zip(i, v)))
                for t, lp, i, v in zip(tokens, self.logprob[lo:hi].tolist(), ids, values)]

    def next_block(self) -> None:
        """Start the next block. Every block has a step that commits: the last step takes all the rest."""
        self.b += 1
        self.step, self.refresh = 0, True
        self.steps = self.block_steps[self.b] if not self.params.parallel else self.block
        self.n_start = int((self.x[self.start: self.end] == self.mask).sum())
        self._settle()

    def _settle(self) -> bool:
        """Skip the steps that would commit nothing (a forward would change nothing); True when the block
        is finished. A committed token can itself be the mask id (neither reference forbids it), so a block
        ends when no masks remain or its step budget is spent; in parallel decoding, one step per position."""
        while self.step < self.steps:
            self.masked = (self.x[self.start: self.end] == self.mask).nonzero()[:, 0]
            if self.masked.numel() == 0:
                return True
            self.count = 0
            if not self.params.parallel:
                self.count = commit_count(self.schedule, self.step, self.steps, self.n_start, self.masked.numel())
                if self.count == 0 and self.params.remasking != "origin":
                    self.step += 1
                    continue
            return False
        return True
