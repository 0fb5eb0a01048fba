"""The block denoiser: parity with the reference algorithms, the commit schedule and the policies."""
import dataclasses

import pytest
import torch
from reference import dream_generate, fast_dllm_generate, llada_generate
from tiny import MASK

from qdllm.engine import LLM, Detokenizer, EngineCore, SamplingParams, load_model
from qdllm.engine.remasking import order_by_factor, sample_positions
from qdllm.engine.schedule import commit_count, split_steps

PROMPT = [5, 6, 7, 8, 9, 10, 11]


@pytest.fixture(scope="module")
def llada(llada_dir):
    return LLM(llada_dir, device="cpu")


@pytest.fixture(scope="module")
def dream(dream_dir):
    return LLM(dream_dir, device="cpu")


@pytest.mark.parametrize("steps,gen,block,cfg", [(16, 16, 4, 0.0), (8, 16, 8, 0.0), (16, 16, 16, 0.0),
                                                 (6, 24, 8, 0.0), (16, 16, 4, 1.5)])
def test_llada_matches_reference_generate(llada, steps, gen, block, cfg):
    ref = llada_generate(llada.model, PROMPT, steps, gen, block, cfg, MASK)
    out = llada.generate(PROMPT, SamplingParams(max_tokens=gen, steps=steps, block_length=block,
                                                cfg_scale=cfg, ignore_eos=True))[0]
    assert out.token_ids == ref
    assert out.nfe == steps * (2 if cfg else 1)


@pytest.mark.parametrize("alg,remasking", [("maskgit_plus", "low_confidence"), ("entropy", "entropy"),
                                           ("topk_margin", "margin")])
@pytest.mark.parametrize("steps,gen", [(16, 16), (5, 20)])
def test_dream_matches_reference_diffusion_generate(dream, alg, remasking, steps, gen):
    ref = dream_generate(dream.model, PROMPT, steps, gen, alg, MASK)
    params = SamplingParams(max_tokens=gen, steps=steps, block_length=gen, remasking=alg, ignore_eos=True)
    assert params.remasking == remasking
    assert dream.generate(PROMPT, params)[0].token_ids == ref


def test_linear_schedule_counts():
    assert [commit_count("linear", i, 4, 10, 10) for i in range(3)] == [3, 3, 2]
    assert split_steps(10, 4) == [3, 3, 2, 2] and split_steps(8, 4) == [2, 2, 2, 2]
    with pytest.raises(ValueError, match="steps"):
        split_steps(3, 4)


def test_timestep_schedule_counts():
    # Dream: int(n * (1 - s/t)) with t = linspace(1, 1e-3, steps + 1); the last step takes the rest
    # t = [1, .75025, .5005, .25075, .001]: 16 * .24975 = 3.996 -> 3; 13 * (1 - .5005/.75025) = 4.33 -> 4
    assert commit_count("timestep", 0, 4, 16, 16) == 3
    assert commit_count("timestep", 1, 4, 16, 13) == 4
    assert commit_count("timestep", 3, 4, 16, 3) == 3


def run(model, params: SamplingParams, eos: frozenset[int] = frozenset()):
    """PROMPT alone through the engine core, with answers as token ids."""
    core = EngineCore(model, Detokenizer(None, eos))
    core.add_request(PROMPT, params)
    while True:
        for out in core.step():
            if out.finished:
                return out


class Recorder(torch.nn.Module):
    """Wraps a model and records the canvas it is fed at each call, and where it is asked for logits."""

    def __init__(self, model):
        super().__init__()
        self.model, self.config, self.embed, self.fed, self.logits_at = model, model.config, model.embed, [], []

    def forward(self, ids, **kw):
        self.fed.append(ids[0].clone())
        self.logits_at.append(kw["logits_at"][0].clone())
        return self.model(ids, **kw)


def commits(fed: list[torch.Tensor], final: list[int], prompt_len: int) -> list[list[int]]:
    """Positions (relative to the canvas) committed at each step, from consecutive canvases."""
    states = [(f[prompt_len:] != MASK) for f in fed] + [torch.tensor(final) != MASK]
    return [(b & ~a).nonzero()[:, 0].tolist() for a, b in zip(states, states[1:])]


def test_token_schedule_blocks_left_to_right(llada_dir):
    rec = Recorder(load_model(llada_dir))
    out = run(rec, SamplingParams(max_tokens=24, steps=12, block_length=8, ignore_eos=True))
    steps = commits(rec.fed, out.token_ids, len(PROMPT))
    assert [len(s) for s in steps] == [2, 2, 2, 2] * 3  # 8 masks over 4 steps per block
    for i, s in enumerate(steps):  # every commit lies in the current block, blocks in order
        assert all(i // 4 * 8 <= p < (i // 4 + 1) * 8 for p in s)
    assert out.nfe == 12 and len(out.token_ids) == 24 and MASK not in out.token_ids


def test_logits_only_at_masked_positions(llada_dir):
    """A forward computes logits only where its block is still masked, so the head's work shrinks as the block
    fills."""
    rec, P = Recorder(load_model(llada_dir)), len(PROMPT)
    run(rec, SamplingParams(max_tokens=16, steps=8, block_length=8, ignore_eos=True))
    assert [len(at) for at in rec.logits_at] == [8, 6, 4, 2] * 2
    for i, (ids, at) in enumerate(zip(rec.fed, rec.logits_at)):
        start = P + 8 * (i // 4)
        assert at.tolist() == ((ids[start: start + 8] == MASK).nonzero()[:, 0] + start).tolist()


def test_uneven_steps_give_earlier_steps_the_extra_token(llada_dir):
    rec = Recorder(load_model(llada_dir))
    run(rec, SamplingParams(max_tokens=8, steps=3, block_length=8, ignore_eos=True))
    assert [len(s) for s in commits(rec.fed[:-1], rec.fed[-1][len(PROMPT):].tolist(), len(PROMPT))] == [3, 3]


def test_threshold_commits_at_least_one_token_per_step(llada_dir):
    rec = Recorder(load_model(llada_dir))
    out = run(rec, SamplingParams(max_tokens=16, block_length=8, threshold=1.0, ignore_eos=True))
    assert [len(s) for s in commits(rec.fed, out.token_ids, len(PROMPT))] == [1] * 16  # nothing reaches 1.0
    assert out.nfe == 16


def test_threshold_commits_every_confident_token(llada_dir):
    model = load_model(llada_dir)
    out = run(model, SamplingParams(max_tokens=16, block_length=8, threshold=1e-9, ignore_eos=True))
    assert out.nfe == 2 and MASK not in out.token_ids  # one step per block


def test_threshold_selects_exactly_those_above(llada_dir):
    """Compare one threshold step with the confidences computed directly."""
    model = load_model(llada_dir)
    ids = torch.tensor(PROMPT + [MASK] * 8)
    p = torch.softmax(model(ids[None])[0, len(PROMPT):].double(), -1).max(-1).values
    threshold = float(p.sort(descending=True).values[2])  # exactly three reach it
    rec = Recorder(model)
    out = run(rec, SamplingParams(max_tokens=8, threshold=threshold, ignore_eos=True))
    first = commits(rec.fed, out.token_ids, len(PROMPT))[0]
    assert sorted(first) == sorted(p.topk(3).indices.tolist())


@pytest.mark.parametrize("rule", [{"threshold": 0.4}, {"threshold": 0.5}, {"factor": 1.0}, {"factor": 2.5}])
def test_parallel_decoding_matches_fast_dllm_generate(llada, rule):
    """Without a cache, threshold and factor decoding equal Fast-dLLM's generate() in tokens and forwards. Each
    rule here commits several tokens in some steps and one in others (2 blocks of 8: 2 < nfe < 16)."""
    ref, nfe = fast_dllm_generate(llada.model, PROMPT, 16, 8, MASK, **rule)
    out = llada.generate(PROMPT, SamplingParams(max_tokens=16, block_length=8, ignore_eos=True, **rule))[0]
    assert (out.token_ids, out.nfe) == (ref, nfe)
    assert 2 < nfe < 16


@pytest.mark.parametrize("conf,factor,chosen", [
    ([0.9, 0.2, 0.99, 0.7], 1.0, [2, 0]),  # bounds -1, 2/3, 3/4, 4/5: the third misses
    ([0.9, 0.95, 0.99, 0.1], 1.0, [2, 1, 0, 3]),  # only the last misses: all of them, as Fast-dLLM counts
    ([0.3, 0.1], 1.0, [0, 1]),  # the second misses and is the last
    ([0.5], 1.0, [0]),
    ([0.5, 0.4, 0.3], 0.1, [0]),  # the second's bound is 1 - 0.1/3
    ([-2.0, -3.0, -4.0], 1.0, [0]),  # below even the first bound (entropy scores): still one
])
def test_factor_rule(conf, factor, chosen):
    assert order_by_factor(torch.tensor(conf, dtype=torch.float64), factor).tolist() == chosen


@pytest.mark.parametrize("remasking", ["low_confidence", "random", "entropy", "margin", "origin"])
def test_every_policy_fills_the_canvas(llada, remasking):
    params = SamplingParams(max_tokens=16, steps=8, block_length=8, remasking=remasking, temperature=0.7,
                            top_p=0.9, seed=3, ignore_eos=True)
    out = llada.generate(PROMPT, params)[0]
    assert len(out.token_ids) == 16 and MASK not in out.token_ids
    assert llada.generate(PROMPT, params)[0].token_ids == out.token_ids  # same seed, same tokens


def test_seeds_change_sampled_output(llada):
    a, b = (llada.generate(PROMPT, SamplingParams(max_tokens=16, temperature=1.0, seed=s, ignore_eos=True))[0]
            for s in (1, 2))
    assert a.token_ids != b.token_ids


def test_alg_temp_samples_positions(dream):
    params = SamplingParams(max_tokens=16, steps=8, block_length=16, alg_temp=0.5, seed=0, ignore_eos=True)
    out = dream.generate(PROMPT, params)[0]
    assert MASK not in out.token_ids and out.nfe == 8


@pytest.mark.parametrize("remasking", ["low_confidence", "random", "entropy"])
@pytest.mark.parametrize("alg_temp,temperature", [(1e-300, 0.0), (1e-4, 0.0), (0.5, 1e300)])
def test_extreme_temperatures_decode(dream, remasking, alg_temp, temperature):
    """A tiny alg_temp underflowed the positions' softmax to one nonzero entry, and the second of two positions
    drawn from it was any masked one (with 5e-324, the softmax was NaN and the step failed); a temperature of
    1e308 overflowed the Gumbel noise, and argmax returned the lowest token ids. At the bounds, the draw is the
    limit: positions in order of confidence (as top-k takes them), tokens uniform."""
    params = SamplingParams(max_tokens=16, steps=8, block_length=16, remasking=remasking, alg_temp=alg_temp,
                            temperature=temperature, seed=0, ignore_eos=True)
    out = dream.generate(PROMPT, params)[0]
    assert MASK not in out.token_ids and out.nfe == 8
    if alg_temp < 1e-3 and remasking != "random":
        top_k = dream.generate(PROMPT, dataclasses.replace(params, alg_temp=0.0))[0]
        assert out.token_ids == top_k.token_ids


def test_sampled_positions_in_the_underflow_limit():
    """Positions drawn past an underflowed softmax are drawn among the rest, still in confidence order (torch's
    draw alone gave [3, 2, ...]: 0.5 before 0.9)."""
    conf = torch.tensor([0.1, 0.9, 0.5, 0.91, 0.3], dtype=torch.float64)
    picked = sample_positions(conf, 4, 1e-300, torch.Generator().manual_seed(0))
    assert picked.tolist() == [3, 1, 2, 4]


@pytest.mark.parametrize("cache,window", [("prefix", 16), ("dual", 8)])
def test_caches_feed_their_windows(llada_dir, cache, window):
    """Each block starts with a full refresh; later steps feed block + suffix (prefix) or the block (dual).
    The refresh is the full forward, so the first step commits what the uncached run commits."""
    model, P = load_model(llada_dir), len(PROMPT)
    fed = {}
    for c in ("none", cache):
        rec = Recorder(model)
        out = run(rec, SamplingParams(max_tokens=16, steps=8, block_length=8, cache=c, ignore_eos=True))
        assert out.nfe == 8 and MASK not in out.token_ids
        fed[c] = rec.fed
    assert [len(f) for f in fed[cache]] == [P + 16] + [window] * 3 + [P + 16] + [8] * 3
    assert fed[cache][1][:8].tolist() == fed["none"][1][P: P + 8].tolist()


class MaskPredictor(Recorder):
    """Always predicts the mask id, which the references may commit as a token."""

    def forward(self, ids, **kw):
        logits = super().forward(ids, **kw)
        logits[..., MASK] += 1000
        return logits


@pytest.mark.parametrize("threshold,nfe", [(None, 8), (0.5, 16)])
def test_committing_the_mask_id_still_ends_each_block(llada_dir, threshold, nfe):
    """As in the references: the linear schedule spends its steps; threshold decoding one step a position."""
    rec = MaskPredictor(load_model(llada_dir))
    out = run(rec, SamplingParams(max_tokens=16, steps=8, block_length=8, threshold=threshold))
    assert out.nfe == nfe and out.token_ids == [MASK] * 16


def test_eos_in_a_finished_block_stops_generation(llada_dir):
    model = load_model(llada_dir)
    every = frozenset(range(128))  # any token ends the answer: the first block must be the last
    out = run(model, SamplingParams(max_tokens=32, steps=32, block_length=8), every)
    assert out.token_ids == [] and out.finish_reason == "stop" and out.nfe == 8


def test_output_is_cut_at_eos_and_max_tokens(llada):
    params = SamplingParams(max_tokens=5, ignore_eos=False)
    cut = llada.engine.detok.cut
    assert cut([3, 4, 125, 6, 7, 8], params) == ([3, 4], "w3 w4", "stop")
    assert cut([3, 4, 5, 6, 7, 125], params) == ([3, 4, 5, 6, 7], "w3 w4 w5 w6 w7", None)
    assert cut([3, 125, 5], SamplingParams(max_tokens=3, ignore_eos=True))[0] == [3, 125, 5]


def test_stop_strings_end_the_text(llada):
    full = llada.generate(PROMPT, SamplingParams(max_tokens=16, ignore_eos=True))[0]
    stop = llada.tokenizer.decode(full.token_ids[5:7])
    out = llada.generate(PROMPT, SamplingParams(max_tokens=16, ignore_eos=True, stop=[stop]))[0]
    assert out.finish_reason == "stop" and stop not in out.text
    assert full.text.startswith(out.text) and out.text == full.text[: full.text.find(stop)]


def test_chat_uses_the_template(llada):
    conv = [{"role": "user", "content": "w3 w4"}]
    out = llada.chat(conv, SamplingParams(max_tokens=8))[0]
    assert out.prompt_token_ids[:1] == [121] and out.prompt_token_ids[-3:] == [121, 123, 120]  # header, unk, end


def test_logit_bias_bans_and_forces_tokens(llada):
    base = llada.generate(PROMPT, SamplingParams(max_tokens=8, ignore_eos=True))[0]
    banned = base.token_ids[0]
    out = llada.generate(PROMPT, SamplingParams(max_tokens=8, ignore_eos=True, logit_bias={banned: -100}))[0]
    assert banned in base.token_ids and banned not in out.token_ids
    forced = llada.generate(PROMPT, SamplingParams(max_tokens=8, ignore_eos=True, logit_bias={7: 100, 9: 0.5}))[0]
    assert forced.token_ids == [7] * 8
    with pytest.raises(ValueError, match=r"logit_bias must name token ids in \[0, 128\), got 500"):
        llada.generate(PROMPT, SamplingParams(logit_bias={5: 1, 500: 1}))


@pytest.mark.parametrize("field,value", [("max_tokens", 0), ("steps", 0), ("temperature", -1), ("top_p", 0),
                                         ("remasking", "best"), ("threshold", 1.5), ("cache", "paged"),
                                         ("stop", [""]), ("schedule", "cosine"), ("max_tokens", True),
                                         ("seed", 2**64), ("seed", -2**63 - 1), ("temperature", float("inf")),
                                         ("top_p", float("nan")), ("cfg_scale", float("inf")), ("logprobs", 21),
                                         ("logprobs", -1), ("logprobs", True), ("presence_penalty", 2.5),
                                         ("frequency_penalty", float("nan")), ("logit_bias", {5: 101}),
                                         ("logit_bias", {"5": 1}), ("logit_bias", {-1: 0}), ("factor", 0),
                                         ("factor", -1.0), ("factor", float("nan")), ("factor", "1"),
                                         ("temperature", 1e301), ("alg_temp", 1e-301), ("alg_temp", 5e-324)])
def test_bad_params_name_the_field(field, value):
    with pytest.raises(ValueError, match=f"SamplingParams.{field}"):
        SamplingParams(**{field: value})


def test_threshold_and_factor_are_not_both_set():
    with pytest.raises(ValueError, match=r"^SamplingParams.factor must be null when threshold is set"):
        SamplingParams(threshold=0.9, factor=1.0)


@pytest.mark.parametrize("rule", [{"threshold": 0.5}, {"factor": 1.0}])
def test_steps_are_ignored_in_parallel_decoding(llada, rule):
    """Fewer steps than blocks once failed when the request was admitted, although a threshold ignores them."""
    params = SamplingParams(max_tokens=16, block_length=4, ignore_eos=True, **rule)
    with_steps = SamplingParams(max_tokens=16, block_length=4, steps=2, ignore_eos=True, **rule)
    assert llada.generate(PROMPT, with_steps)[0].token_ids == llada.generate(PROMPT, params)[0].token_ids


@pytest.mark.parametrize("call,message", [
    (lambda llm: llm.generate(5), r"^prompts must be a string, a list of token ids, or a list of those, got 5$"),
    (lambda llm: llm.generate(None), r"^prompts must be .*, got None$"),
    (lambda llm: llm.generate("hi", {"max_tokens": 4}),
     r"^params must be a SamplingParams or a list of them, one per prompt, got \{'max_tokens': 4\}$"),
    (lambda llm: llm.chat("hi"), r"^conversations must be a list of messages, or a list of those, got 'hi'$"),
    (lambda llm: llm.chat([[]]), r"^conversation 0 must be a non-empty list of messages, got \[\]$"),
    (lambda llm: llm.chat([{"content": "hi"}]),
     r"^conversation 0, message 0: expected a dict with string 'role' and 'content', got \{'content': 'hi'\}$"),
    (lambda llm: llm.chat([{"role": "user", "content": 5}]), r"^conversation 0, message 0: expected a dict"),
])
def test_python_api_refuses_wrong_types_by_name(llada, call, message):
    """These raised TypeError or AttributeError from deep inside (\"'str' object has no attribute 'logit_bias'\"),
    or rendered a message without its role."""
    with pytest.raises(TypeError, match=message):
        call(llada)


@pytest.mark.parametrize("kw,message", [
    ({"max_num_seqs": "8"}, r"^max_num_seqs must be an integer >= 1, got '8'$"),
    ({"max_batch_tokens": 0}, r"^max_batch_tokens must be an integer >= 1, got 0$"),
    ({"max_model_len": 1.5}, r"^max_model_len must be None or an integer >= 1, got 1.5$"),
    ({"kv_cache_memory": True}, r"^kv_cache_memory must be None or an integer >= 1, got True$"),
    ({"cuda_graphs": 0}, r"^cuda_graphs must be None, True or False, got 0$"),
])
def test_engine_settings_of_the_wrong_type_are_refused(llada_dir, kw, message):
    """max_num_seqs="8" failed comparing str with int; max_model_len=1.5 was taken, and quoted in later errors."""
    with pytest.raises(ValueError, match=message):
        LLM(llada_dir, device="cpu", **kw)


def test_python_api_paths_and_devices(llada_dir):
    with pytest.raises(TypeError, match=r"^path must be a checkpoint or artifact folder \(a str or Path\), got None$"):
        LLM(None)
    with pytest.raises(TypeError, match="^path must be"):
        load_model(5)
    with pytest.raises(ValueError, match=r"^device must be cpu, cuda or cuda:N, got 'cpu:5'$"):
        LLM(llada_dir, device="cpu:5")


def test_bad_prompts(llada):
    with pytest.raises(ValueError, match="token ids"):
        llada.generate([[5, 999]])
    with pytest.raises(ValueError, match="at least one token"):
        llada.generate([[]])
    with pytest.raises(ValueError, match="context"):
        llada.generate(PROMPT, SamplingParams(max_tokens=1000))
