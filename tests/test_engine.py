"""The engine core: batch independence, parity, early stop, streaming, budgets, stats and failures."""
import dataclasses
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from reference import llada_generate
from tiny import MASK

from qdllm.engine import LLM, Detokenizer, EngineCore, SamplingParams, load_model, load_tokenizer, remasking
from qdllm.engine.errors import RequestError
from qdllm.engine.scheduler import similar_lengths
from qdllm.engine.sequence import Window
from qdllm.engine.tokenizer import chat_prompt

ASSET = Path(__file__).parents[1] / "assets" / "llada-shakespeare"

# Mixed lengths, block sizes, policies and caches, so every batch mixes full and window forwards.
REQUESTS = [
    ([5, 6, 7, 8, 9, 10, 11], SamplingParams(max_tokens=16, steps=8, block_length=8, ignore_eos=True)),
    ([12, 13, 14], SamplingParams(max_tokens=24, block_length=8, cache="prefix", threshold=0.3, ignore_eos=True)),
    ([20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30], SamplingParams(max_tokens=12, steps=12, block_length=4,
                                                                  cache="dual", ignore_eos=True)),
    ([40, 41], SamplingParams(max_tokens=16, steps=8, block_length=16, cfg_scale=1.5, cache="prefix",
                              ignore_eos=True)),
    ([50, 51, 52, 53], SamplingParams(max_tokens=8, steps=8, block_length=8, temperature=0.8, top_p=0.9, seed=7,
                                      remasking="random", ignore_eos=True)),
    ([60, 61, 62, 63, 64], SamplingParams(max_tokens=16, steps=16, block_length=8, remasking="margin", cache="dual",
                                          threshold=0.2, ignore_eos=True)),
]


def drain(core: EngineCore, stagger: dict[int, tuple[list[int], SamplingParams]] | None = None) -> dict:
    """Step until done, adding `stagger[step]` requests at those steps; every output by request id."""
    outputs, step = {}, 0
    while core.has_unfinished() or (stagger and step <= max(stagger)):
        if stagger and step in stagger:
            core.add_request(*stagger[step], request_id=f"late-{step}")
        for out in core.step():
            outputs.setdefault(out.request_id, []).append(out)
        step += 1
    return outputs


def alone(model, prompt, params, eos=frozenset()):
    core = EngineCore(model, Detokenizer(None, eos), max_num_seqs=2)
    core.add_request(prompt, params, request_id="solo")
    return drain(core)["solo"][-1]


@pytest.mark.parametrize("stagger", [False, True])
def test_batched_requests_give_the_tokens_they_give_alone(model_dir, stagger):
    model = load_model(model_dir)
    solo = [alone(model, p, s) for p, s in REQUESTS]
    core = EngineCore(model, Detokenizer(None, frozenset()), max_num_seqs=8)
    if stagger:  # arrivals between steps, in a different order
        outputs = drain(core, {3 * i: r for i, r in enumerate(reversed(REQUESTS))})
        batched = [outputs[f"late-{3 * i}"][-1] for i in reversed(range(len(REQUESTS)))]
    else:
        ids = [core.add_request(p, s) for p, s in REQUESTS]
        outputs = drain(core)
        batched = [outputs[i][-1] for i in ids]
    assert core.stats.forwards < sum(o.nfe for o in solo)  # they really shared forwards
    for a, b in zip(solo, batched):
        assert b.token_ids == a.token_ids and b.nfe == a.nfe
        assert MASK not in b.token_ids and b.finish_reason == "length"


def test_proposals_split_into_chunks_give_the_same_tokens(llada_dir, monkeypatch):
    """A forward call's proposals are batched up to a memory bound; split one request a chunk, as a step with
    large logits is, they are the same."""
    model, runs = load_model(llada_dir), []
    for chunk in (remasking.CHUNK_ELEMENTS, 1):
        monkeypatch.setattr(remasking, "CHUNK_ELEMENTS", chunk)
        core = EngineCore(model, Detokenizer(None, frozenset()), max_num_seqs=8)
        ids = [core.add_request(p, dataclasses.replace(s, logprobs=1)) for p, s in REQUESTS]
        outputs = drain(core)
        runs.append([(outputs[i][-1].token_ids, outputs[i][-1].logprobs) for i in ids])
    assert core.stats.forwards < sum(len(t) for t, _ in runs[1])  # requests shared forward calls
    assert runs[0] == runs[1]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("cuda_graphs", [False, True])
def test_cuda_engine_gives_the_cpu_tokens(model_dir, cuda_graphs):
    """On CUDA the canvas stays on the host, forward inputs go over from pinned memory and each forward's
    proposals come back in one transfer: the same tokens and logprobs as on the CPU. The model runs in float64 so
    that near-ties resolve alike (its RoPE tables are float32, as the references compute them, so logprobs
    agree to about float32's precision). The sampled request is left out: its draws come from a CUDA
    generator."""
    requests = [(p, dataclasses.replace(s, logprobs=2, presence_penalty=0.5, logit_bias={9: 3.0}))
                for p, s in REQUESTS if s.temperature == 0]
    runs = []
    for device in ("cpu", "cuda"):
        model = load_model(model_dir, device=device, dtype=torch.float64)
        core = EngineCore(model, Detokenizer(None, frozenset()), max_num_seqs=8,
                          cuda_graphs=cuda_graphs and device == "cuda")
        ids = [core.add_request(p, s) for p, s in requests]
        outputs = drain(core)
        runs.append([outputs[i][-1] for i in ids])
    for cpu, cuda in zip(*runs):
        assert cuda.token_ids == cpu.token_ids and cuda.nfe == cpu.nfe
        assert [t.token_id for t in cuda.logprobs] == cpu.token_ids
        torch.testing.assert_close([t.logprob for t in cuda.logprobs], [t.logprob for t in cpu.logprobs],
                                   rtol=1e-3, atol=1e-5)


def test_batched_requests_match_the_reference_generate(llada_dir):
    llm = LLM(llada_dir, device="cpu")
    prompts = [[5, 6, 7, 8, 9, 10, 11], [30, 31, 32], [40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50, 51]]
    params = [SamplingParams(max_tokens=16, steps=16, block_length=4, ignore_eos=True),
              SamplingParams(max_tokens=24, steps=12, block_length=8, ignore_eos=True),
              SamplingParams(max_tokens=16, steps=8, block_length=16, cfg_scale=1.0, ignore_eos=True)]
    outs = llm.generate(prompts, params)
    for prompt, p, out in zip(prompts, params, outs):
        assert out.token_ids == llada_generate(llm.model, prompt, p.steps, p.max_tokens, p.block_length,
                                               p.cfg_scale, MASK)


def test_a_long_request_gets_its_own_forward_and_the_same_tokens(llada_dir):
    """One full forward would pad all four sequences to the longest (4 x 108 tokens a step); the short ones
    share a call of their own (108 + 3 x 12)."""
    model = load_model(llada_dir)
    params = SamplingParams(max_tokens=8, steps=8, block_length=8, ignore_eos=True)
    prompts = [list(range(4, 104)), [5, 6, 7, 8], [9, 10, 11, 12], [13, 14, 15, 16]]
    solo = [alone(model, p, params) for p in prompts]
    core = EngineCore(model, Detokenizer(None, frozenset()), max_num_seqs=4)
    ids = [core.add_request(p, params) for p in prompts]
    outputs = drain(core)
    assert [outputs[i][-1].token_ids for i in ids] == [o.token_ids for o in solo]
    assert (core.stats.steps, core.stats.forwards, core.stats.tokens) == (8, 16, 8 * (108 + 3 * 12))


def _plan(fed: int, length: int, full: bool):
    """A running request, as similar_lengths sees it, whose step feeds `fed` tokens of its `length`."""
    return SimpleNamespace(seq=SimpleNamespace(length=length)), Window(length - fed, length, 0, 0, full)


def test_similar_lengths_pads_no_row_more_than_twice():
    full = [_plan(n, n, True) for n in (60, 200, 16, 110, 30, 150, 100)]
    assert [[w.hi for _, w in g] for g in similar_lengths(full)] == [[200, 150, 110, 100], [60, 30], [16]]
    # Window forwards: alike in the tokens fed, apart in the positions attended over, and the other way round.
    windows = [_plan(32, 250, False), _plan(32, 100, False), _plan(32, 60, False), _plan(8, 70, False)]
    assert [[(w.hi - w.lo, r.seq.length) for r, w in g] for g in similar_lengths(windows)] == [
        [(32, 250)], [(32, 100), (32, 60)], [(8, 70)]]
    assert similar_lengths([]) == []


def test_early_stop_spends_fewer_forwards_and_frees_the_slot(llada_dir):
    """An EOS in the first block ends that request after one block; its neighbour is unaffected and a
    waiting request takes the slot."""
    model = load_model(llada_dir)
    first = alone(model, *REQUESTS[0]).token_ids
    eos = frozenset({first[3]})  # this token is committed in the first block
    core = EngineCore(model, Detokenizer(None, eos), max_num_seqs=2)
    stopping = core.add_request(REQUESTS[0][0], SamplingParams(max_tokens=16, steps=8, block_length=8))
    other = core.add_request(*REQUESTS[2])
    late = core.add_request(*REQUESTS[2])
    outputs = drain(core)
    end = outputs[stopping][-1]
    assert end.finish_reason == "stop" and end.token_ids == first[: first.index(first[3])]
    assert end.nfe == 4 < 8  # one block of the two
    assert outputs[other][-1].token_ids == outputs[late][-1].token_ids == alone(model, *REQUESTS[2]).token_ids
    assert len(outputs[other]) == 3  # one output per block


def test_max_tokens_shorter_than_the_canvas_truncates(llada_dir):
    model = load_model(llada_dir)
    full = alone(model, [5, 6, 7], SamplingParams(max_tokens=16, steps=16, block_length=8, ignore_eos=True))
    cut = alone(model, [5, 6, 7], SamplingParams(max_tokens=11, steps=16, block_length=8, ignore_eos=True))
    assert cut.token_ids == full.token_ids[:11] and cut.finish_reason == "length"


def test_token_budget_caps_the_batch_and_everyone_finishes(llada_dir):
    model = load_model(llada_dir)
    core = EngineCore(model, Detokenizer(None, frozenset()), max_num_seqs=8, max_batch_tokens=40)
    ids = [core.add_request(p, s) for p, s in REQUESTS[:3]]
    most = 0
    outputs = {}
    while core.has_unfinished():
        for out in core.step():
            outputs.setdefault(out.request_id, []).append(out)
        most = max(most, core.stats.running)
    assert most == 1  # each sequence alone fills the 40-token budget
    for i, (p, s) in zip(ids, REQUESTS[:3]):
        assert outputs[i][-1].token_ids == alone(model, p, s).token_ids


def test_abort_frees_slots_running_and_waiting(llada_dir):
    model = load_model(llada_dir)
    core = EngineCore(model, Detokenizer(None, frozenset()), max_num_seqs=1)
    running = core.add_request(*REQUESTS[2])  # dual cache: it holds KV pages
    waiting = core.add_request(*REQUESTS[0])
    core.step()
    assert core.stats.running == 1 and core.stats.waiting == 1
    core.abort_request(running)
    core.abort_request(waiting)
    outs = core.step()
    assert sorted((o.request_id, o.finish_reason, o.finished) for o in outs) == [
        (running, "abort", True), (waiting, "abort", True)]
    assert not core.has_unfinished() and core.free_rows == 1 and core.stats.aborted == 2
    assert core.pool.used_pages == 0 and core.pool.pages > 0


def test_stats_count_the_work(llada_dir):
    model = load_model(llada_dir)
    core = EngineCore(model, Detokenizer(None, frozenset()), max_num_seqs=4)
    ids = [core.add_request(p, s) for p, s in REQUESTS[:2]]
    final = {k: v[-1] for k, v in drain(core).items()}
    st = core.stats
    assert st.nfe == sum(final[i].nfe for i in ids) and st.finished == 2 and st.running == 0
    assert 0 < st.batch_occupancy <= 0.5  # two of four slots at most
    for i in ids:
        s = final[i].stats
        assert 0 <= s.queue_s <= s.first_block_s <= s.latency_s and final[i].tokens_per_s > 0


def test_bad_requests_name_what_is_wrong(llada_dir):
    core = EngineCore(load_model(llada_dir), Detokenizer(None, frozenset()), max_num_seqs=1, max_model_len=64)
    for prompt, params, match in [([], SamplingParams(), "at least one token"),
                                  ([5, 4096], SamplingParams(), r"token ids in \[0, 128\)"),
                                  ("text", SamplingParams(), "token ids"),
                                  ([5] * 40, SamplingParams(max_tokens=30, block_length=8),
                                   r"max_model_len \(64 tokens\)"),
                                  ([5], SamplingParams(max_tokens=10**23), r"canvas \(10{23}: max_tokens"),
                                  ([5], SamplingParams(max_tokens=16, block_length=4, steps=2), "steps"),
                                  ([5], SamplingParams(max_tokens=8, cfg_scale=1.0), "two sequence slots"),
                                  ([5], SamplingParams(max_tokens=8, stop=["x"]), "needs a tokenizer")]:
        with pytest.raises(ValueError, match=match):
            core.add_request(prompt, params)
    assert not core.has_unfinished()


def test_logprobs_are_those_of_the_forward_that_committed_each_token(llada_dir):
    """Two steps per block commit four tokens each from one forward: each token's logprob and alternatives are
    that forward's log-softmax at its position (float64), and an EOS cut cuts the logprobs with the tokens."""
    model = load_model(llada_dir)
    prompt, params = [5, 6, 7], SamplingParams(max_tokens=16, block_length=8, steps=4, logprobs=3, ignore_eos=True)
    out = alone(model, prompt, params)
    assert [t.token_id for t in out.logprobs] == out.token_ids
    x = torch.tensor([prompt + [MASK] * 16])
    committed = 0
    while committed < 16:
        lp = torch.log_softmax(model(x)[0].double(), -1)
        block = committed // 8
        masked = [i for i in range(block * 8, block * 8 + 8) if x[0, 3 + i] == MASK]
        conf = {i: lp[3 + i].max().item() for i in masked}
        now = sorted(masked, key=lambda i: -conf[i])[:4]
        for i in now:
            t = out.logprobs[i]
            assert t.token_id == lp[3 + i].argmax().item()
            torch.testing.assert_close(t.logprob, lp[3 + i, t.token_id].item(), rtol=1e-6, atol=1e-6)
            top = lp[3 + i].topk(3)
            assert [j for j, _ in t.top] == top.indices.tolist()
            torch.testing.assert_close([v for _, v in t.top], top.values.tolist(), rtol=1e-6, atol=1e-6)
            x[0, 3 + i] = t.token_id
        committed += len(now)
    eos = out.token_ids[5]
    cut = alone(model, prompt, dataclasses.replace(params, ignore_eos=False), eos=frozenset({eos}))
    assert [t.token_id for t in cut.logprobs] == cut.token_ids == out.token_ids[: out.token_ids.index(eos)]


def test_penalties_lower_the_logits_of_tokens_already_generated(llada_dir):
    """Greedy, one token per step: each step commits the most confident masked position of the penalized
    distribution, whose logits drop by frequency x count + presence for each token generated so far."""
    model = load_model(llada_dir)
    prompt = [5, 6, 7]
    params = SamplingParams(max_tokens=8, steps=8, block_length=8, presence_penalty=0.5, frequency_penalty=1.5,
                            ignore_eos=True)
    x = torch.tensor(prompt + [MASK] * 8)
    for _ in range(8):
        logits = model(x[None])[0, 3:].double()
        counts = torch.bincount(x[3:][x[3:] != MASK], minlength=logits.shape[-1]).double()
        conf, token = (logits - 1.5 * counts - 0.5 * (counts > 0).double()).softmax(-1).max(-1)
        i = conf.masked_fill(x[3:] != MASK, -1).argmax()
        x[3 + i] = token[i]
    out = alone(model, prompt, params)
    assert out.token_ids == x[3:].tolist()
    assert out.token_ids != alone(model, prompt, dataclasses.replace(params, presence_penalty=0.0,
                                                                   frequency_penalty=0.0)).token_ids


def test_an_infill_denoises_the_canvas_between_prompt_and_suffix(llada_dir):
    """Greedy, one token per step, without a cache: the reference loop over prompt + masks + suffix; the suffix
    conditions the tokens, and infills batch with other requests as they run alone."""
    model = load_model(llada_dir)
    prompt, suffix = [5, 6, 7], [20, 21, 22, 23]
    params = SamplingParams(max_tokens=8, steps=8, block_length=8, ignore_eos=True)
    x = torch.tensor(prompt + [MASK] * 8 + suffix)
    for _ in range(8):
        conf, token = model(x[None])[0, 3:11].double().softmax(-1).max(-1)
        i = conf.masked_fill(x[3:11] != MASK, -1).argmax()
        x[3 + i] = token[i]
    core = EngineCore(model, Detokenizer(None, frozenset()), max_num_seqs=8)
    infills = [(params, core.add_request(prompt, params, suffix=suffix))]
    for cache, cfg in (("prefix", 0.0), ("dual", 0.0), ("none", 1.5)):
        p = dataclasses.replace(params, cache=cache, cfg_scale=cfg)
        infills.append((p, core.add_request(prompt, p, suffix=suffix)))
    others = [(p, s, core.add_request(p, s)) for p, s in REQUESTS[:3]]
    outputs = drain(core)
    assert outputs[infills[0][1]][-1].token_ids == x[3:11].tolist() != alone(model, prompt, params).token_ids
    for p, rid in infills[1:]:
        solo = EngineCore(model, Detokenizer(None, frozenset()), max_num_seqs=2)
        solo.add_request(prompt, p, request_id="solo", suffix=suffix)
        assert outputs[rid][-1].token_ids == drain(solo)["solo"][-1].token_ids
    assert all(outputs[rid][-1].token_ids == alone(model, p, s).token_ids for p, s, rid in others)
    with pytest.raises(ValueError, match=r"plus suffix \(250 tokens\) exceeds the model's context of 256 tokens"):
        core.add_request(prompt, params, suffix=[5] * 250)
    with pytest.raises(ValueError, match=r"a suffix must be a string or a list of token ids in \[0, 128\)"):
        core.add_request(prompt, params, suffix=[5, 500])
    for field, ids in (("prompt", dict(prompt=[5, MASK, 7])), ("suffix", dict(prompt=prompt, suffix=[9, 9, MASK]))):
        with pytest.raises(RequestError, match=rf"^a {field} must not hold the mask token \(id {MASK}, at token "
                                               rf"{ids[field].index(MASK)}\): only the canvas is filled in") as e:
            core.add_request(params=params, **ids)
        assert e.value.field == field


def test_a_kv_budget_allocates_the_pool_whole_and_changes_no_token(llada_dir):
    """Ten pages shared by four slots: a long request takes nine, the requests behind it wait for pages (not
    slots), and every request gives the tokens it gives alone. One row per slot would have held 40 positions."""
    model = load_model(llada_dir)  # fp32, 2 layers x 4 KV heads x 16 dims: 1024 bytes of K and V per position
    long = (list(range(3, 103)), SamplingParams(max_tokens=32, steps=8, block_length=8, cache="prefix",
                                                ignore_eos=True))  # 132 positions: nine pages
    requests = [long, *REQUESTS]
    solo = [alone(model, p, s) for p, s in requests]
    core = EngineCore(model, Detokenizer(None, frozenset()), max_num_seqs=4, kv_cache_memory=161 * 1024 + 1023)
    pool = core.pool
    assert core.max_model_len == pool.capacity == 160 and pool.nbytes == 161 * 1024
    ids = [core.add_request(p, s) for p, s in requests]
    outputs, waited_for_pages = {}, 0
    while core.has_unfinished():
        for out in core.step():
            outputs.setdefault(out.request_id, []).append(out)
        assert pool.used_pages <= 10 and core.stats.kv_usage == pool.used_pages / 10
        waited_for_pages += bool(core.waiting and core.free_rows)
    assert waited_for_pages and core.pool is pool and pool.k.shape[1] == 161  # never regrown
    assert pool.used_pages == 0 and core.free_rows == 4
    assert [outputs[i][-1].token_ids for i in ids] == [o.token_ids for o in solo]
    with pytest.raises(ValueError, match="exceeds the 160 positions that kv_cache_memory holds"):
        core.add_request([5] * 150, SamplingParams(max_tokens=16, block_length=8))
    with pytest.raises(ValueError, match=r"two rows of 100 positions \(cfg_scale\); that exceeds the 160 positions "
                                         "that kv_cache_memory holds"):
        core.add_request([5] * 84, SamplingParams(max_tokens=16, block_length=8, cfg_scale=1.0, cache="dual"))
    core.add_request([5] * 84, SamplingParams(max_tokens=16, block_length=8, cfg_scale=1.0))  # no cache: no pages


def test_a_pool_that_runs_out_of_device_memory_makes_requests_wait_and_fails_only_what_it_cannot_hold(
        llada_dir, device_room):
    """A device with room for 12 pages: the pool grows to 9 pages for a long request, then to 11 (13 did not fit),
    then stops. The requests that fit wait for pages and give the tokens they give alone; one queued before the
    pool stopped, which needs 12 pages, fails alone, and one like it is refused from then on."""
    model = load_model(llada_dir)
    long = (list(range(3, 103)), SamplingParams(max_tokens=32, steps=8, block_length=8, cache="prefix",
                                                ignore_eos=True))  # 132 positions: nine pages
    huge = ([5] * 170, SamplingParams(max_tokens=16, block_length=8, cache="dual"))  # 186: twelve pages
    requests = [long, *REQUESTS]
    solo = [alone(model, p, s) for p, s in requests]
    device_room(12)
    core = EngineCore(model, Detokenizer(None, frozenset()), max_num_seqs=4)
    ids = [core.add_request(p, s) for p, s in requests + [huge]]
    outputs = drain(core)
    pool = core.pool
    assert pool.pages == 11 and pool.out_of_memory and pool.used_pages == 0 and core.free_rows == 4
    assert [outputs[i][-1].token_ids for i in ids[:-1]] == [o.token_ids for o in solo]
    (failed,) = outputs[ids[-1]]
    message = ("with a cache, prompt plus canvas keeps K/V for 186 positions; that exceeds the 176 positions that "
               "the KV pool held when the device ran out of memory as it grew (0.000169 GiB)")
    assert (failed.finished, failed.finish_reason, failed.error, failed.token_ids) == (True, "error", message, [])
    assert core.stats.failed == 1 and core.stats.finished == len(requests)
    with pytest.raises(ValueError, match=re.escape(message)):
        core.add_request(*huge)


def forward_room(monkeypatch, tokens: int) -> list[int]:
    """From then on, forward calls run on a pretend device where a call of more than `tokens` padded tokens fails
    as a CUDA allocation does; returns the padded tokens of every call tried."""
    from qdllm.engine import scheduler
    tried, run = [], scheduler.run_forward

    def within(model, pool, full, ids, *rest):
        tried.append(ids.numel())
        if ids.numel() > tokens:
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate activations for {ids.shape}")
        return run(model, pool, full, ids, *rest)
    monkeypatch.setattr(scheduler, "run_forward", within)
    return tried


def test_a_forward_that_runs_out_of_device_memory_is_split_and_later_calls_stay_below_it(
        llada_dir, monkeypatch, caplog):
    """Room for 40 tokens a call: every request fits alone (the CFG one feeds 2 x 18), the batch does not. The
    calls that fail are run again in halves, the engine remembers the size that failed, and the requests give the
    tokens they give alone."""
    model = load_model(llada_dir)
    solo = [alone(model, p, s) for p, s in REQUESTS]
    tried = forward_room(monkeypatch, 40)
    core = EngineCore(model, Detokenizer(None, frozenset()), max_num_seqs=8)
    ids = [core.add_request(p, s) for p, s in REQUESTS]
    outputs = drain(core)
    assert [outputs[i][-1].token_ids for i in ids] == [o.token_ids for o in solo]
    assert core.stats.failed == 0 and core.stats.finished == len(REQUESTS)
    failures = [t for t in tried if t > 40]
    # each failure lowers the size that later calls stay below, so none is tried twice
    assert len(failures) > 1 and failures == sorted(set(failures), reverse=True) and core.oom_tokens == failures[-1]
    assert caplog.text.count("ran out of device memory; forward calls are split below that") == len(failures)


def test_a_request_whose_forward_does_not_fit_even_alone_fails_alone(llada_dir, monkeypatch):
    model = load_model(llada_dir)
    big = ([5] * 60, SamplingParams(max_tokens=16, steps=8, block_length=8, ignore_eos=True))  # 76 tokens a forward
    small = REQUESTS[0]
    expected = alone(model, *small).token_ids
    forward_room(monkeypatch, 40)
    core = EngineCore(model, Detokenizer(None, frozenset()), max_num_seqs=4)
    a, b = core.add_request(*small), core.add_request(*big)
    outputs = drain(core)
    assert outputs[a][-1].token_ids == expected and outputs[a][-1].finish_reason == "length"
    (failed,) = outputs[b]
    assert (failed.finished, failed.finish_reason, failed.token_ids) == (True, "error", [])
    assert failed.error == "the device ran out of memory for this request's forward of 76 tokens, even alone"
    assert core.stats.failed == 1 and core.free_rows == 4 and not core.has_unfinished()


def test_a_kv_budget_that_cannot_hold_what_is_asked_is_refused(llada_dir):
    model = load_model(llada_dir)
    detok = Detokenizer(None, frozenset())
    with pytest.raises(ValueError, match=r"^kv_cache_memory: 4096 bytes hold 0 positions \(1024 bytes each, in pages "
                                         r"of 16, plus one scratch position\); a default request \(one prompt "
                                         r"token\) needs 129: raise the budget to at least 148480 bytes$"):
        EngineCore(model, detok, max_num_seqs=4, kv_cache_memory=4096)
    with pytest.raises(ValueError, match=r"hold 192 positions .*; max_model_len 256 needs 263168: raise the budget "
                                         r"or lower max_model_len$"):
        EngineCore(model, detok, max_num_seqs=4, max_model_len=256, kv_cache_memory=201 * 1024)
    roomy = EngineCore(model, detok, max_num_seqs=1, kv_cache_memory=1 << 30)  # more than one slot can use
    assert roomy.max_model_len == roomy.pool.capacity == 256 and roomy.pool.nbytes == 257 * 1024
    with pytest.raises(ValueError, match="exceeds the model's context of 256 tokens"):
        roomy.add_request([5] * 250, SamplingParams(max_tokens=16, block_length=8))


class FailOnce(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model, self.config, self.embed, self.failed = model, model.config, model.embed, False

    def forward(self, ids, **kw):
        if not self.failed:
            self.failed = True
            raise RuntimeError("CUDA out of memory")
        return self.model(ids, **kw)


def test_clear_after_a_failed_step_leaves_a_working_engine(llada_dir):
    model = load_model(llada_dir)
    core = EngineCore(FailOnce(model), Detokenizer(None, frozenset()), max_num_seqs=2)
    a = core.add_request(*REQUESTS[0])
    with pytest.raises(RuntimeError, match="out of memory"):
        core.step()
    assert core.clear() == [a] and core.free_rows == 2 and core.pool.used_pages == 0
    assert alone(model, *REQUESTS[0]).token_ids == drain_one(core, *REQUESTS[0]).token_ids


def test_llm_works_after_a_failed_call(llada_dir):
    """A failed generate left its requests queued, and every later call failed with the same error."""
    llm = LLM(llada_dir, device="cpu")
    prompt, params = REQUESTS[0]
    expected = llm.generate(prompt, params)[0].token_ids
    llm.engine.model = FailOnce(llm.model)
    with pytest.raises(RuntimeError, match="out of memory"):
        llm.generate(prompt, params)
    assert not llm.engine.has_unfinished() and llm.engine.pool.used_pages == 0
    assert llm.generate(prompt, params)[0].token_ids == expected


def drain_one(core, prompt, params):
    rid = core.add_request(prompt, params)
    return drain(core)[rid][-1]


# ---- the shipped model: real tokenizer, real text -----------------------------------------------

@pytest.fixture(scope="module")
def shipped():
    return load_model(ASSET, dtype=torch.float32), load_tokenizer(ASSET)


def chat(tok, text):
    return chat_prompt(tok, [{"role": "user", "content": text}])


def test_shipped_model_batches_independently_and_streams_a_growing_text(shipped):
    model, tok = shipped
    eos = frozenset({tok.eos_token_id})
    prompts = [chat(tok, q) for q in ("Who is there?", "What news from Rome, my lord?", "Speak.")]
    params = [SamplingParams(max_tokens=64, block_length=16, cache="prefix", threshold=0.9),
              SamplingParams(max_tokens=48, block_length=16, steps=24),
              SamplingParams(max_tokens=64, block_length=32, cache="dual", threshold=0.9, stop=["\n\n"])]
    solo = []
    for p, s in zip(prompts, params):
        core = EngineCore(model, Detokenizer(tok, eos), max_num_seqs=1)
        solo.append(drain_one(core, p, s))
    core = EngineCore(model, Detokenizer(tok, eos), max_num_seqs=4)
    ids = [core.add_request(p, s) for p, s in zip(prompts, params)]
    outputs = drain(core)
    for i, a in zip(ids, solo):
        stream = outputs[i]
        final = stream[-1]
        assert final.token_ids == a.token_ids and final.text == a.text and final.text
        assert "".join(o.delta_text for o in stream) == final.text
        assert sum((o.delta_token_ids for o in stream), []) == final.token_ids
        assert all(final.text.startswith(o.text) for o in stream)
    assert solo[2].finish_reason == "stop" and "\n\n" not in solo[2].text


def test_stream_holds_back_a_possible_stop_string_start():
    params = SamplingParams(stop=["\n\nHAMLET"])
    assert Detokenizer.stable("Good night.\n\nHAM", params) == "Good night."
    assert Detokenizer.stable("Good night.\n", params) == "Good night."
    assert Detokenizer.stable("caf\ufffd", SamplingParams()) == "caf"  # half of a UTF-8 character
    assert Detokenizer.stable("Good night.", params) == "Good night."
