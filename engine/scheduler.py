"""The engine core: step-level continuous batching of block-wise denoising requests.

Each `step()` advances every running request by one denoising step. Requests that need a full
forward (no cache, or a cache refresh at the start of a block) share padded forward calls; requests
in the middle of a block feed only their window (block plus suffix, or the block alone) and share
calls that attend over the pooled K/V. A call takes rows of similar lengths only (`similar_lengths`), so
one long request does not make every short one in the batch pay for its length. Requests join between
steps when a slot and the token budget allow, and leave as soon as they finish, are cancelled, or stop early.
"""
from __future__ import annotations

import itertools
import logging
import time
from collections import deque
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .cuda_graphs import ForwardGraphs, run_forward
from .errors import RequestError
from .kv_cache import PAGE, KVPool, pages_for, pages_within, position_bytes
from .model import DiffusionLM
from .output import Detokenizer, RequestOutput, RequestStats
from .sampling import SamplingParams
from .remasking import Proposal, propose
from .sequence import Sequence, Window, block_layout, footprint

log = logging.getLogger("qdllm.engine")


@dataclass
class EngineStats:
    """Counters since the engine started, and the state after the latest step."""

    steps: int = 0
    forwards: int = 0  # batched forward calls
    rows: int = 0  # canvas rows fed, summed over forwards
    tokens: int = 0  # padded tokens fed, summed over forwards
    nfe: int = 0  # network evaluations, as requests count them
    finished: int = 0
    aborted: int = 0
    failed: int = 0  # requests that could not run (finish_reason "error")
    running: int = 0
    waiting: int = 0
    occupancy_sum: float = 0.0  # running / max_num_seqs, summed over steps
    kv_usage: float = 0.0  # share of the KV pool's pages that running requests hold

    @property
    def batch_occupancy(self) -> float:
        """Mean fraction of the sequence slots in use per step."""
        return self.occupancy_sum / self.steps if self.steps else 0.0


def _fed(group: list[tuple[_Request, Window]]) -> int:
    """Tokens a forward call of these plans feeds, padded to its longest row."""
    return sum(r.seq.rows for r, _ in group) * max(w.hi - w.lo for _, w in group)


def _too_long(prompt: int, suffix: int, room: int) -> str:
    """The field to shorten when a request outgrows `room` positions: the prompt or the suffix (the longer) when
    with them there is no room left for one generated token, else max_tokens."""
    if prompt + suffix < room:
        return "max_tokens"
    return "suffix" if suffix > prompt else "prompt"


@dataclass
class _Request:
    id: str
    prompt: list[int]
    params: SamplingParams
    stats: RequestStats
    suffix: list[int]
    seq: Sequence | None = None
    kv: list[Tensor] | None = None  # each row's flat K/V positions (kv_cache.py); empty without a cache
    sent_tokens: list[int] = field(default_factory=list)
    sent_text: str = ""


def similar_lengths(plans: list[tuple[_Request, Window]]) -> list[list[tuple[_Request, Window]]]:
    """The plans split into forward calls whose rows are padded at most 2x in each of the two lengths a row
    pays for: the tokens it feeds and the positions it attends over (its sequence, for a window forward).
    Rows of a usual batch fall in one call; a long request among short ones gets a call of its own, since one
    call pads every row to its longest. It also bounds a call's padded tokens by twice the tokens fed."""
    calls: list[tuple[list, list[int]]] = []  # (plans, [fed min, fed max, attended min, attended max])
    for r, w in sorted(plans, key=lambda p: (p[1].hi - p[1].lo, p[0].seq.length), reverse=True):
        fed, seen = w.hi - w.lo, w.hi - w.lo if w.full else r.seq.length
        for group, bounds in calls:
            f_lo, f_hi, s_lo, s_hi = bounds
            if max(f_hi, fed) <= 2 * min(f_lo, fed) and max(s_hi, seen) <= 2 * min(s_lo, seen):
                group.append((r, w))
                bounds[:] = min(f_lo, fed), max(f_hi, fed), min(s_lo, seen), max(s_hi, seen)
                break
        else:
            calls.append(([(r, w)], [fed, fed, seen, seen]))
    return [group for group, _ in calls]


class EngineCore:
    """Owns the model and the KV pool; not thread-safe (the async front runs it on one thread).

    max_num_seqs:     requests denoised together; a CFG request counts two.
    max_batch_tokens: cap on the tokens of the running requests' full sequences (rows x length); one
                      request alone is always admitted.
    max_model_len:    the longest prompt plus canvas accepted (default: the model's context).
    cuda_graphs:      replay forwards of up to 2048 padded tokens from CUDA graphs (cuda_graphs.py); needs CUDA.
                      None: on for a CUDA device (on the H100 they doubled batch-1 decoding), off otherwise.
    kv_cache_memory:  bytes for the paged KV pool, allocated whole now; max_model_len becomes at most what it
                      holds, and requests wait for pages when running ones hold them. None: the pool grows
                      as admissions need (up to max_model_len in every slot), so the device can run out of
                      memory under load.
    """

    def __init__(self, model: DiffusionLM, detokenizer: Detokenizer, max_num_seqs: int = 8,
                 max_batch_tokens: int = 16384, max_model_len: int | None = None,
                 cuda_graphs: bool | None = None, kv_cache_memory: int | None = None):
        cfg = model.config
        for name, value in (("max_num_seqs", max_num_seqs), ("max_batch_tokens", max_batch_tokens),
                            ("max_model_len", max_model_len), ("kv_cache_memory", kv_cache_memory)):
            optional = name in ("max_model_len", "kv_cache_memory")
            if not (optional and value is None) and (type(value) is not int or value < 1):
                raise ValueError(f"{name} must be {'None or ' if optional else ''}an integer >= 1, got {value!r}")
        if cuda_graphs is not None and type(cuda_graphs) is not bool:
            raise ValueError(f"cuda_graphs must be None, True or False, got {cuda_graphs!r}")
        self.model, self.detok = model, detokenizer
        self.device = model.embed.weight.device
        if cuda_graphs and self.device.type != "cuda":
            raise ValueError(f"cuda_graphs needs a CUDA device; the model is on {self.device}")
        if cuda_graphs is None:
            cuda_graphs = self.device.type == "cuda"
        self.graphs = ForwardGraphs(model, max_num_seqs) if cuda_graphs else None
        self.max_num_seqs, self.max_batch_tokens = max_num_seqs, max_batch_tokens
        if max_model_len is not None and not 1 <= max_model_len <= cfg.max_seq_len:
            raise ValueError(f"max_model_len must be in [1, {cfg.max_seq_len}] (the model's context), "
                             f"got {max_model_len}")
        self.max_model_len = max_model_len or cfg.max_seq_len
        self.limit = (f"max_model_len ({self.max_model_len} tokens)" if max_model_len
                      else f"the model's context of {self.max_model_len} tokens")  # for the error of check()
        w = model.embed.weight
        if kv_cache_memory is None:
            self.pool = KVPool(cfg, 0, w.device, w.dtype, max_pages=max_num_seqs * pages_for(self.max_model_len))
        else:
            pages = self._fit_kv_budget(kv_cache_memory, explicit=max_model_len is not None)
            self.pool = KVPool(cfg, pages, w.device, w.dtype)
            if self.pool.capacity < self.max_model_len:
                self.max_model_len = self.pool.capacity
                self.limit = f"the {self.max_model_len} positions that kv_cache_memory holds"
        self.free_rows = max_num_seqs  # sequence slots: a CFG request takes two
        self.waiting: deque[_Request] = deque()
        self.running: list[_Request] = []
        self.aborts: set[str] = set()
        self.oom_tokens: int | None = None  # the fewest tokens a forward fed when it ran out of device memory
        self.stats = EngineStats()
        self._ids = itertools.count()

    def _fit_kv_budget(self, budget: int, explicit: bool) -> int:
        """The pages a KV pool of `budget` bytes holds; ValueError if they cannot hold a default request, or an
        `explicit` max_model_len."""
        cfg, dtype = self.model.config, self.model.embed.weight.dtype
        pages, per = pages_within(budget, cfg, dtype), position_bytes(cfg, dtype)
        pages = min(pages, self.max_num_seqs * pages_for(self.max_model_len))  # never more than the slots can use
        where = (f"kv_cache_memory: {budget} bytes hold {pages * PAGE} positions ({per} bytes each, in pages of "
                 f"{PAGE}, plus one scratch position)")
        least = min(footprint(1, SamplingParams())[1], self.max_model_len)
        if pages * PAGE < least:
            raise ValueError(f"{where}; a default request (one prompt token) needs {least}: raise the budget to "
                             f"at least {(pages_for(least) * PAGE + 1) * per} bytes")
        if explicit and pages * PAGE < self.max_model_len:
            raise ValueError(f"{where}; max_model_len {self.max_model_len} needs "
                             f"{(pages_for(self.max_model_len) * PAGE + 1) * per}: raise the budget or lower "
                             f"max_model_len")
        return pages

    # ---- requests -------------------------------------------------------------------------------

    def check(self, prompt: list[int], params: SamplingParams, suffix: list[int] | None = None) -> None:
        """Raise RequestError, naming the field, for a request this engine can never run."""
        vocab = self.model.config.vocab_size
        if isinstance(prompt, list) and not prompt:
            raise RequestError("a prompt must hold at least one token", "prompt")
        suffix = [] if suffix is None else suffix
        mask = self.model.config.mask_token_id
        for name, ids in (("prompt", prompt), ("suffix", suffix)):
            if not isinstance(ids, list) or not all(type(t) is int and 0 <= t < vocab for t in ids):
                raise RequestError(f"a {name} must be a string or a list of token ids in [0, {vocab})", name)
            if mask in ids:  # only the canvas is denoised (LLaDA's generate would also fill in a prompt's masks)
                raise RequestError(f"a {name} must not hold the mask token (id {mask}, at token {ids.index(mask)}): "
                                   f"only the canvas is filled in; for text between a prompt and a suffix, give "
                                   f"the suffix", name)
        if params.logit_bias and params.logit_bias[-1][0] >= vocab:
            raise RequestError(f"SamplingParams.logit_bias must name token ids in [0, {vocab}), got "
                               f"{params.logit_bias[-1][0]}", "logit_bias")
        block, n_blocks = block_layout(params)
        rows, length = footprint(len(prompt), params, len(suffix))
        if length > self.max_model_len:
            with_suffix = f" plus suffix ({len(suffix)} tokens)" if suffix else ""
            raise RequestError(f"prompt ({len(prompt)} tokens) plus canvas ({block * n_blocks}: max_tokens rounded "
                               f"up to whole blocks){with_suffix} exceeds {self.limit}",
                               _too_long(len(prompt), len(suffix), self.max_model_len))
        if params.steps is not None and not params.parallel and params.steps < n_blocks:
            raise RequestError(f"SamplingParams.steps ({params.steps}) must be at least the number of blocks "
                               f"({n_blocks})", "steps")
        if rows > self.max_num_seqs:
            raise RequestError(f"cfg_scale needs two sequence slots; the engine has max_num_seqs={self.max_num_seqs}",
                               "cfg_scale")
        if params.cache != "none" and rows * pages_for(length) > self.pool.page_limit:
            raise RequestError(self._beyond_pool(rows, length),
                               _too_long(len(prompt), len(suffix), self.pool.page_limit * PAGE // rows))
        if params.stop and self.detok.tokenizer is None:
            raise RequestError("SamplingParams.stop needs a tokenizer; this engine has none", "stop")

    def _beyond_pool(self, rows: int, length: int) -> str:
        """Why a cached request of `rows` x `length` positions can never run: the pool's limit and its cause."""
        pool = self.pool
        need = f"two rows of {length} positions (cfg_scale)" if rows == 2 else f"{length} positions"
        held = (f"the KV pool held when the device ran out of memory as it grew ({pool.nbytes / 2**30:.3g} GiB)"
                if pool.out_of_memory else "kv_cache_memory holds")
        return f"with a cache, prompt plus canvas keeps K/V for {need}; that exceeds the {pool.page_limit * PAGE} " \
               f"positions that {held}"

    def add_request(self, prompt: list[int], params: SamplingParams, request_id: str | None = None,
                    stats: RequestStats | None = None, suffix: list[int] | None = None) -> str:
        """Queue a request; with a `suffix`, the canvas is filled in between the prompt and it."""
        self.check(prompt, params, suffix)
        request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
        self.waiting.append(_Request(request_id, list(prompt), params, stats or RequestStats(), list(suffix or [])))
        self.stats.waiting = len(self.waiting)
        return request_id

    def abort_request(self, request_id: str) -> None:
        """Drop the request at the next step; its slots and KV pages return to the pool."""
        self.aborts.add(request_id)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def request_ids(self) -> list[str]:
        return [r.id for r in self.running] + [r.id for r in self.waiting]

    def clear(self) -> list[str]:
        """Drop every request, as after a failed step; return their ids."""
        ids = self.request_ids()
        for r in self.running:
            self._release(r)
        self.running, self.aborts = [], set()
        self.waiting.clear()
        self._count_state()
        return ids

    # ---- the step -------------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        """One denoising step for every running request; outputs for those that finished a block or ended."""
        outputs = self._drop_aborted()
        outputs += self._admit()
        if not self.running:
            self._count_state()
            return outputs
        plans = [(r, r.seq.window()) for r in self.running]
        occupancy = sum(r.seq.rows for r in self.running) / self.max_num_seqs
        proposals: dict[int, Proposal | None] = {}  # by id(request); None: its forward found no device memory
        for full in (True, False):
            for group in similar_lengths([(r, w) for r, w in plans if w.full == full]):
                proposals.update((id(r), p) for r, p in self._forward_within_memory(group, full))
        for r, w in plans:  # in admission order, whichever call served them
            if proposals[id(r)] is None:
                outputs.append(self._fail(r, f"the device ran out of memory for this request's forward of "
                                             f"{_fed([(r, w)])} tokens, even alone"))
            elif r.seq.commit(*proposals[id(r)]):
                outputs.append(self._finish_block(r))
        self.running = [r for r in self.running if r.seq is not None]
        st = self.stats
        st.steps += 1
        st.occupancy_sum += occupancy
        self._count_state()
        return outputs

    def _count_state(self) -> None:
        st, pool = self.stats, self.pool
        st.running, st.waiting = len(self.running), len(self.waiting)
        st.kv_usage = pool.used_pages / pool.pages if pool.pages else 0.0

    def _drop_aborted(self) -> list[RequestOutput]:
        if not self.aborts:
            return []
        outputs = []
        for r in [r for r in self.running if r.id in self.aborts]:
            outputs.append(self._output(r, r.sent_tokens, r.sent_text, "abort"))
            self._release(r)
        self.running = [r for r in self.running if r.seq is not None]
        for r in [r for r in self.waiting if r.id in self.aborts]:
            self.waiting.remove(r)
            outputs.append(self._output(r, r.sent_tokens, r.sent_text, "abort"))
        self.stats.aborted += len(outputs)
        self.aborts.clear()
        return outputs

    def _admit(self) -> list[RequestOutput]:
        """First come, first served: the head of the queue waits until its slots, KV pages and tokens fit. A
        queued request that needs more K/V than the pool can ever hold (it stopped growing when the device ran
        out of memory) fails alone; its output carries the error."""
        busy = sum(r.seq.rows * r.seq.length for r in self.running)
        failed = []
        while self.waiting:
            r = self.waiting[0]
            rows, length = footprint(len(r.prompt), r.params, len(r.suffix))
            tokens = rows * length
            pages = rows * pages_for(length) if r.params.cache != "none" else 0
            if pages > self.pool.page_limit:
                self.waiting.popleft()
                failed.append(self._output(r, [], "", "error", error=self._beyond_pool(rows, length)))
                continue
            if rows > self.free_rows or (self.running and busy + tokens > self.max_batch_tokens):
                break
            if pages and not self.pool.reserve(pages):
                if pages > self.pool.page_limit:
                    continue  # the pool just stopped growing below what it needs: it fails above
                break  # running requests hold the pages
            r.seq = Sequence(r.prompt, r.params, self.model.config, self.device, r.suffix)  # raising, r stays queued
            self.waiting.popleft()
            self.free_rows -= rows
            r.kv = self.pool.allocate(length, rows) if pages else []
            r.stats.scheduled = time.perf_counter()
            self.running.append(r)
            busy += tokens
        self.stats.failed += len(failed)
        return failed

    def _forward_within_memory(self, group: list[tuple[_Request, Window]],
                               full: bool) -> list[tuple[_Request, Proposal | None]]:
        """Each request of the group with its proposal for this step. A call that runs out of device memory is run
        again in halves, and from then on calls as large are halved before they run, down to single requests, which are
        always tried; one that alone does not fit gets None. The retry runs after the except block, so the
        failed call's activations are freed first."""
        if len(group) == 1 or self.oom_tokens is None or _fed(group) < self.oom_tokens:
            try:
                return list(zip([r for r, _ in group], self._forward(group, full)))
            except torch.OutOfMemoryError:
                pass
            self._out_of_memory(_fed(group))
            if len(group) == 1:
                return [(group[0][0], None)]
        half = len(group) // 2
        return self._forward_within_memory(group[:half], full) + self._forward_within_memory(group[half:], full)

    def _out_of_memory(self, tokens: int) -> None:
        """A forward of `tokens` fed tokens ran out of device memory: later calls are split to stay below it."""
        if self.device.type == "cuda":
            torch.cuda.empty_cache()  # the failed call's blocks go back to the device, whole
        if self.oom_tokens is None or tokens < self.oom_tokens:
            self.oom_tokens = tokens
            log.warning("a forward of %d tokens ran out of device memory; forward calls are split below that "
                        "from now on", tokens)

    def _forward(self, group: list[tuple[_Request, Window]], full: bool) -> list[Proposal]:
        """One padded forward for the group, with logits at each request's masked positions only, and the
        proposals from them, which reach the host in one transfer. With CUDA graphs, a forward they take is
        padded to their shape and replayed; its logits are used before any other replay can overwrite them."""
        B = sum(r.seq.rows for r, _ in group)
        L = max(w.hi - w.lo for _, w in group)
        read = L if full else max(r.seq.length for r, _ in group)
        shape = self.graphs.shape(B, L, read, full) if self.graphs is not None else None
        rows, L, read = shape or (B, L, read)
        masked = [r.seq.masked for r, _ in group]
        n = max(w.end - w.start for _, w in group) if shape is not None else max(map(len, masked))  # graphs: fixed
        cached = any(r.params.cache != "none" for r, _ in group)
        scratch = self.pool.scratch_position
        dev = self.device
        # built on the host, in pinned memory for a CUDA device: then their copies do not wait on the device
        pin = dev.type == "cuda"
        ids = torch.zeros(rows, L, dtype=torch.long, pin_memory=pin)
        positions = torch.zeros(rows, L, dtype=torch.long, pin_memory=pin)
        write_index = torch.full((rows, L), scratch, dtype=torch.long, pin_memory=pin)
        read_index = torch.full((rows, read), scratch, dtype=torch.long, pin_memory=pin)  # read by window forwards
        key_mask = torch.zeros(rows, read, dtype=torch.bool, pin_memory=pin)
        key_mask[B:, 0] = True  # padding rows attend to something, so their (unread) outputs stay finite
        logits_at = torch.zeros(rows, n, dtype=torch.long, pin_memory=pin)
        row = 0
        for (r, w), m in zip(group, masked):
            x = r.seq.inputs()[:, w.lo: w.hi]
            span = torch.arange(w.lo, w.hi)
            for j in range(r.seq.rows):
                ids[row, : w.hi - w.lo] = x[j]
                positions[row, : w.hi - w.lo] = span
                if r.kv:
                    write_index[row, : w.hi - w.lo] = r.kv[j][w.lo: w.hi]
                    if not full:
                        read_index[row, : r.seq.length] = r.kv[j]
                key_mask[row, : (w.hi - w.lo) if full else r.seq.length] = True
                logits_at[row, : len(m)] = m + (w.start - w.lo)
                row += 1
        inputs = (ids, positions, key_mask, write_index, read_index, logits_at)
        pool = self.pool if cached else None
        if shape is not None:
            logits = self.graphs.forward(pool, full, *inputs)
        else:
            logits = run_forward(self.model, pool, full, *(t.to(dev, non_blocking=True) for t in inputs))
        st = self.stats
        st.forwards, st.rows, st.tokens, st.nfe = st.forwards + 1, st.rows + B, st.tokens + rows * L, st.nfe + B
        rows, row = [], 0
        for (r, _), m in zip(group, masked):
            rows.append(r.seq.prepare(logits[row: row + r.seq.rows, : len(m)]))
            row += r.seq.rows
        return propose(rows, [r.params for r, _ in group], [r.seq.gen for r, _ in group])

    # ---- outputs --------------------------------------------------------------------------------

    def _finish_block(self, r: _Request) -> RequestOutput:
        """The block just finished: end the request on EOS, a stop string or the last block, else go on."""
        seq = r.seq
        if r.stats.first_block is None:
            r.stats.first_block = time.perf_counter()
        generated = seq.generated
        tokens, text, reason = self.detok.cut(generated, r.params)
        # EOS anywhere in the finished block ends the request, as in the references, even past max_tokens
        ended = reason is not None or seq.last_block or (
            not r.params.ignore_eos and bool(self.detok.eos_ids.intersection(generated[-seq.block:])))
        if ended and reason is None:
            reason = "length"
        output = self._output(r, tokens, text, reason)
        if reason is None:
            seq.next_block()
        else:
            self._release(r)
            self.stats.finished += 1
        return output

    def _output(self, r: _Request, tokens: list[int], text: str, reason: str | None,
                error: str | None = None) -> RequestOutput:
        """The answer so far; an unfinished one streams only the text that no later block can change."""
        if reason is None:
            text = self.detok.stable(text, r.params)
        else:
            r.stats.finished = time.perf_counter()
        delta_tokens, delta_text = tokens[len(r.sent_tokens):], text[len(r.sent_text):]
        r.sent_tokens, r.sent_text = tokens, text
        nfe, logprobs = (r.seq.nfe, r.seq.logprobs(tokens)) if r.seq is not None else (0, None)
        return RequestOutput(r.id, r.prompt, tokens, text, delta_tokens, delta_text, reason is not None, reason,
                             nfe, r.stats, logprobs, error)

    def _fail(self, r: _Request, error: str) -> RequestOutput:
        """End a running request with finish_reason "error"; its output keeps what was already streamed."""
        output = self._output(r, r.sent_tokens, r.sent_text, "error", error=error)
        self._release(r)
        self.stats.failed += 1
        return output

    def _release(self, r: _Request) -> None:
        self.free_rows += r.seq.rows
        for positions in r.kv:
            self.pool.release(positions)
        r.seq, r.kv = None, None
