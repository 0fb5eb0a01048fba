"""qdllm-serve as users run it: a real process on a loopback port, driven by the official openai client."""
import asyncio
import json
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch

from qdllm.engine import LLM, SamplingParams, TokenLogprob
from qdllm.engine.tokenizer import chat_prompt
from qdllm.server.protocol import json_values

ASSET = Path(__file__).parents[1] / "assets" / "llada-shakespeare"
SERVE = str(Path(sys.executable).parent / "qdllm-serve")
KEY = "test-key"
MODEL = "llada-shakespeare"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, model: Path, *flags: str, serve: tuple[str, ...] = (SERVE,)):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([*serve, str(model), "--port", str(self.port), *flags],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.time() + 120
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"qdllm-serve exited: {self.proc.stdout.read()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError("qdllm-serve did not become healthy")

    def stop(self, sig: int = signal.SIGTERM) -> tuple[int, str]:
        self.proc.send_signal(sig)
        try:
            out, _ = self.proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate()
        return self.proc.returncode, out


@pytest.fixture(scope="module")
def server():
    s = Server(ASSET, "--api-key", KEY, "--max-batch", "8")
    yield s
    code, log = s.stop()
    assert code == 0, log
    assert "prompt_tokens=" in log and "nfe=" in log  # one line per request
    assert "Traceback" not in log


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)


@pytest.fixture(scope="module")
def llm():
    return LLM(ASSET, device="cpu", dtype=torch.float32)


def test_completion_equals_the_offline_engine(client, llm):
    out = client.completions.create(model=MODEL, prompt="HAMLET.\nTo be, or not", max_tokens=32,
                                    extra_body={"block_length": 16, "cache": "prefix"})
    ref = llm.generate("HAMLET.\nTo be, or not", SamplingParams(max_tokens=32, block_length=16, cache="prefix"))[0]
    assert out.choices[0].text == ref.text and ref.text
    assert out.choices[0].finish_reason == ref.finish_reason
    assert out.usage.prompt_tokens == len(ref.prompt_token_ids)
    assert out.usage.completion_tokens == len(ref.token_ids)
    assert out.model == MODEL and out.object == "text_completion"


def test_chat_stream_concatenates_to_the_plain_answer(client, llm):
    messages = [{"role": "user", "content": "Who is there?"}]
    extra = {"block_length": 16, "cache": "dual", "threshold": 0.5}
    plain = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=48, extra_body=extra)
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=48, extra_body=extra,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    ref = llm.chat(messages, SamplingParams(max_tokens=48, block_length=16, cache="dual", threshold=0.5))[0]
    assert text == plain.choices[0].message.content == ref.text and text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [plain.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens == len(ref.token_ids)
    assert plain.usage.prompt_tokens == len(chat_prompt(llm.tokenizer, messages))


def test_logprobs_are_the_engines_and_their_tokens_spell_the_answer(client, llm):
    """Chat (plain and streamed) and completions: one entry per generated token, with the engine's values; the
    tokens' texts concatenate to the answer, and greedy decoding takes the most likely token."""
    messages = [{"role": "user", "content": "Who is there?"}]
    extra = {"block_length": 16, "cache": "dual"}
    kw = dict(model=MODEL, messages=messages, max_tokens=32, logprobs=True, top_logprobs=3, extra_body=extra)
    plain = client.chat.completions.create(**kw)
    ref = llm.chat(messages, SamplingParams(max_tokens=32, block_length=16, cache="dual", logprobs=3))[0]
    content = plain.choices[0].logprobs.content
    assert len(content) == len(ref.token_ids) == plain.usage.completion_tokens
    assert [e.logprob for e in content] == [t.logprob for t in ref.logprobs]
    assert [[x.logprob for x in e.top_logprobs] for e in content] == [[lp for _, lp in t.top] for t in ref.logprobs]
    assert "".join(e.token for e in content) == plain.choices[0].message.content
    assert all(e.token == e.top_logprobs[0].token and bytes(e.bytes) == e.token.encode() for e in content)
    chunks = [c for c in client.chat.completions.create(**kw, stream=True) if c.choices and c.choices[0].logprobs]
    streamed = [e for c in chunks for e in c.choices[0].logprobs.content]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in content]
    out = client.completions.create(model=MODEL, prompt="HAMLET.\nTo be, or not", max_tokens=16, logprobs=0,
                                    extra_body={"block_length": 16})
    lp = out.choices[0].logprobs
    assert "".join(lp.tokens) == out.choices[0].text and len(lp.token_logprobs) == out.usage.completion_tokens
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    assert lp.top_logprobs == [{}] * len(lp.tokens)
    without = client.completions.create(model=MODEL, prompt="HAMLET.\n", max_tokens=8)
    assert without.choices[0].logprobs is None
    with pytest.raises(openai.BadRequestError, match="top_logprobs needs logprobs set to true"):
        client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, top_logprobs=2)
    with pytest.raises(openai.BadRequestError, match=r"top_logprobs must be null or an integer in \[0, 20\]"):
        client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, logprobs=True, top_logprobs=21)


def test_a_token_that_holds_part_of_a_character_has_its_own_bytes(client, llm):
    """The byte-fallback token <0xE2> (the first of the euro sign's three), forced by logit_bias: its text shows
    U+FFFD, its bytes are 0xE2."""
    e2 = llm.tokenizer.convert_tokens_to_ids("<0xE2>")
    out = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Who is there?"}],
                                         max_tokens=1, logprobs=True, logit_bias={str(e2): 100})
    (entry,) = out.choices[0].logprobs.content
    assert (out.choices[0].message.content, entry.token, entry.bytes) == ("\ufffd", "\ufffd", [0xE2])


def byte_level_bpe():
    """A real byte-level BPE tokenizer (GPT-2's scheme, as Dream's), trained here on a few lines of the plays."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    text = (ASSET / "data" / "test.txt").read_text().splitlines()[:2000]
    trainer = trainers.BpeTrainer(vocab_size=600, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|endoftext|>"], show_progress=False)
    tok.train_from_iterator(text, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


@pytest.mark.parametrize("kind", ["byte fallback", "byte level"])
def test_token_bytes_join_to_the_texts_utf8(llm, kind):
    """Every token's bytes, joined, are the text's UTF-8, where characters split over byte tokens, whose own text
    shows U+FFFD or nothing; a whole character's bytes are its text's, with the tokenizer's spacing."""
    from qdllm.server.logprobs import chat_logprobs

    tokenizer = llm.tokenizer if kind == "byte fallback" else byte_level_bpe()
    text = "Naïve Hamlet pays 5 € for 漢字, and smiles 😀."
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text
    content = chat_logprobs(tokenizer, [TokenLogprob(i, 0.0, ((i, 0.0),)) for i in ids], [])["content"]
    assert b"".join(bytes(e["bytes"]) for e in content) == text.encode()
    assert any("\ufffd" in e["token"] or not e["token"] for e in content)  # some tokens split a character
    assert all(e["bytes"] == e["top_logprobs"][0]["bytes"] for e in content)
    whole = [e for e in content if "\ufffd" not in e["token"] and e["token"]]
    assert all(bytes(e["bytes"]) == e["token"].encode() for e in whole)


def test_penalties_and_logit_bias_are_the_engines(client, llm):
    kw = dict(max_tokens=24, block_length=8, presence_penalty=0.5, frequency_penalty=1)
    out = client.completions.create(model=MODEL, prompt="KING.\n", max_tokens=24, presence_penalty=0.5,
                                    frequency_penalty=1, extra_body={"block_length": 8})
    assert out.choices[0].text == llm.generate("KING.\n", SamplingParams(**kw))[0].text
    plain = llm.generate("KING.\n", SamplingParams(max_tokens=24, block_length=8))[0]
    assert out.choices[0].text != plain.text
    banned = plain.token_ids[0]
    out = client.completions.create(model=MODEL, prompt="KING.\n", max_tokens=24, logit_bias={str(banned): -100},
                                    extra_body={"block_length": 8})
    ref = llm.generate("KING.\n", SamplingParams(max_tokens=24, block_length=8, logit_bias={banned: -100}))[0]
    assert out.choices[0].text == ref.text and banned not in ref.token_ids


def test_a_suffix_makes_an_infill(client, llm):
    prompt, suffix = "HAMLET.\nTo be, or not to be,", " that is the question.\n"
    out = client.completions.create(model=MODEL, prompt=prompt, suffix=suffix, max_tokens=16,
                                    extra_body={"block_length": 16})
    ref = llm.generate(prompt, SamplingParams(max_tokens=16, block_length=16), suffix=suffix)[0]
    assert out.choices[0].text == ref.text and ref.text
    assert ref.text != llm.generate(prompt, SamplingParams(max_tokens=16, block_length=16))[0].text
    with pytest.raises(openai.BadRequestError, match="suffix holds 200000 characters"):
        client.completions.create(model=MODEL, prompt=prompt, suffix="a" * 200000, max_tokens=16)


def test_echo_starts_each_text_with_its_prompt(client, llm):
    kw = dict(model=MODEL, prompt=["KING.\n", "ROMEO.\n"], max_tokens=16, n=2, temperature=1.0, seed=3)
    plain, echoed = client.completions.create(**kw), client.completions.create(**kw, echo=True)
    heads = ["KING.\n", "KING.\n", "ROMEO.\n", "ROMEO.\n"]  # choice p * n + i belongs to prompt p
    assert [c.text for c in echoed.choices] == [h + c.text for h, c in zip(heads, plain.choices)]
    ids = llm.tokenizer("KING.\n")["input_ids"]
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=8, echo=True)
    assert by_ids.choices[0].text.startswith(llm.tokenizer.decode(ids))
    streamed = ["", "", "", ""]
    for chunk in client.completions.create(**kw, echo=True, stream=True):
        for c in chunk.choices:
            streamed[c.index] += c.text
    assert streamed == [c.text for c in echoed.choices]
    with pytest.raises(openai.BadRequestError, match="echo with logprobs asks for the prompt's logprobs"):
        client.completions.create(model=MODEL, prompt="KING.\n", max_tokens=8, echo=True, logprobs=1)


@pytest.mark.parametrize("rule", [{"threshold": 0.5}, {"factor": 1.0}])
def test_steps_is_ignored_in_parallel_decoding(client, llm, rule):
    """Fewer steps than blocks failed in the engine thread when a threshold was set, and the request hung."""
    out = client.with_options(timeout=60).completions.create(
        model=MODEL, prompt="KING.\n", max_tokens=16, extra_body={"block_length": 4, "steps": 2, **rule})
    ref = llm.generate("KING.\n", SamplingParams(max_tokens=16, block_length=4, **rule))[0]
    assert out.choices[0].text == ref.text


def test_n_choices_are_seeded_and_reproducible(client):
    kw = dict(model=MODEL, prompt="ROMEO.\n", max_tokens=16, n=2, temperature=1.0, seed=11)
    a, b = client.completions.create(**kw), client.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert a.choices[0].text != a.choices[1].text


def test_models_health_and_metrics(server, client):
    client.completions.create(model=MODEL, prompt="ROMEO:", max_tokens=4)  # counted whatever tests ran before
    assert [m.id for m in client.models.list().data] == [MODEL]
    card = client.models.retrieve(MODEL)
    assert card.id == MODEL and card.owned_by == "qdllm" and card.max_model_len == 256
    with pytest.raises(openai.NotFoundError, match="model 'gpt-4' does not exist; this server serves"):
        client.models.retrieve("gpt-4")
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    text = httpx.get(server.url + "/metrics").text
    for name in ("qdllm_requests_total", "qdllm_generation_tokens_total", "qdllm_queue_depth",
                 "qdllm_batch_occupancy", "qdllm_kv_cache_usage", "qdllm_nfe_total",
                 "qdllm_request_latency_seconds_bucket"):
        assert name in text
    assert 'qdllm_requests_total{endpoint="/v1/completions",status="200"}' in text
    assert 'qdllm_requests_total{endpoint="/v1/models/{model}",status="404"} 1' in text


@pytest.mark.parametrize("body,status,param", [
    (b'{"model": "llada-shakespeare", "prompt": ', 400, None),  # malformed JSON
    (b'{"model": "llada-shakespeare", "prompt": "\xff\xfe"}', 400, None),  # not UTF-8
    (b'["not", "an", "object"]', 400, None),
    (json.dumps({"model": MODEL, "prompt": "a", "max_tokens": "ten"}).encode(), 422, "max_tokens"),
    (json.dumps({"model": MODEL}).encode(), 422, "prompt"),
    (json.dumps({"model": "gpt-4", "prompt": "a"}).encode(), 404, "model"),
    (json.dumps({"model": MODEL, "prompt": "a", "max_tokens": 0}).encode(), 400, "max_tokens"),
    (json.dumps({"model": MODEL, "prompt": "a", "max_tokens": 100000}).encode(), 400, "max_tokens"),
    (json.dumps({"model": MODEL, "prompt": "a", "n": 1000}).encode(), 400, "n"),
    (json.dumps({"model": MODEL, "prompt": "a", "remasking": "best"}).encode(), 400, "remasking"),
    (json.dumps({"model": MODEL, "prompt": "a", "logprobs": 21}).encode(), 400, "logprobs"),
    (json.dumps({"model": MODEL, "prompt": "a", "presence_penalty": -3}).encode(), 400, "presence_penalty"),
    (json.dumps({"model": MODEL, "prompt": "a", "logit_bias": {"x": 1}}).encode(), 400, "logit_bias"),
    (json.dumps({"model": MODEL, "prompt": "a", "logit_bias": {"5": 101}}).encode(), 400, "logit_bias"),
    (json.dumps({"model": MODEL, "prompt": "a", "logit_bias": {"99999": 1}}).encode(), 400, "logit_bias"),
    (json.dumps({"model": MODEL, "prompt": "a", "logprobs": True}).encode(), 422, "logprobs"),
    (json.dumps({"model": MODEL, "prompt": [5, 99999]}).encode(), 400, "prompt"),
    (json.dumps({"model": MODEL, "prompt": []}).encode(), 400, "prompt"),
    # Seeds beyond torch's 64-bit range failed inside the engine thread: the request hung (or, with n > 1, the
    # choices in flight got 503).
    (json.dumps({"model": MODEL, "prompt": "a", "seed": 2**64}).encode(), 400, "seed"),
    (json.dumps({"model": MODEL, "prompt": "a", "seed": 2**64 - 1, "n": 2}).encode(), 400, "seed"),
    # Bodies the JSON reader fails on other than with a JSONDecodeError were 500s.
    (b"[" * 20000 + b"]" * 20000, 400, None),  # RecursionError (a body of more values gets 413 before parsing)
    (b'{"model": "llada-shakespeare", "max_tokens": 1' + b"0" * 5000 + b"}", 400, None),  # over 4300 digits
    (b'{"model": "llada-shakespeare", "prompt": "a\\ud800"}', 400, "prompt"),  # lone surrogate: the tokenizer failed
    # Non-finite numbers were taken: temperature=inf decoded garbage.
    (b'{"model": "llada-shakespeare", "prompt": "a", "cfg_scale": Infinity}', 400, None),
    (b'{"model": "llada-shakespeare", "prompt": "a", "temperature": 1e400}', 422, "temperature"),
    # Union fields were named with pydantic's member tag ('prompt.str').
    (json.dumps({"model": MODEL, "prompt": [[5], "a"]}).encode(), 422, "prompt"),
    (json.dumps({"model": MODEL, "prompt": "a", "stop": ["a", 5]}).encode(), 422, "stop"),
    # More prompts than the queue holds got 503 "retry later", which could never succeed.
    (json.dumps({"model": MODEL, "prompt": ["a"] * 200}).encode(), 400, "prompt"),
    # A prompt too long for the context is refused before it is tokenized (a 100 MB one took the server's memory).
    (json.dumps({"model": MODEL, "prompt": "a" * 200000}).encode(), 400, "prompt"),
    (json.dumps({"model": MODEL, "prompt": [5] * 3_000_000}).encode(), 413, None),  # over 8 MiB
    # Unknown fields were dropped: a misspelt setting had no effect and no error.
    (json.dumps({"model": MODEL, "prompt": "a", "threshhold": 0.9}).encode(), 400, "threshhold"),
    (json.dumps({"model": MODEL, "prompt": "a", "alg_temp": -1}).encode(), 400, "alg_temp"),
    (json.dumps({"model": MODEL, "prompt": "a", "schedule": "bogus"}).encode(), 400, "schedule"),
    (json.dumps({"model": MODEL, "prompt": "a", "factor": 0}).encode(), 400, "factor"),
    (json.dumps({"model": MODEL, "prompt": "a", "factor": 1.0, "threshold": 0.9}).encode(), 400, "factor"),
    # Guidance near fp32's range gave NaN logits: a 500, or NaN in the JSON of a stream.
    (json.dumps({"model": MODEL, "prompt": "a", "cfg_scale": 1e39}).encode(), 400, "cfg_scale"),
    # Every request too long for the context was blamed on max_tokens.
    (json.dumps({"model": MODEL, "prompt": [5] * 300, "max_tokens": 4}).encode(), 400, "prompt"),
    (json.dumps({"model": MODEL, "prompt": "a", "suffix": " a" * 300, "max_tokens": 4}).encode(), 400, "suffix"),
    (json.dumps({"model": MODEL, "prompt": [5] * 200, "max_tokens": 100}).encode(), 400, "max_tokens"),
    # The mask token typed in the text was taken as a mask that nothing would fill in.
    (json.dumps({"model": MODEL, "prompt": "Who is <|mdm_mask|>?"}).encode(), 400, "prompt"),
    (json.dumps({"model": MODEL, "prompt": "a", "suffix": "<|mdm_mask|>"}).encode(), 400, "suffix"),
])
def test_bad_completion_requests_get_openai_errors(server, body, status, param):
    r = httpx.post(server.url + "/v1/completions", content=body,
                   headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["message"] and "Traceback" not in r.text


def test_bad_chat_requests_and_the_client_exceptions(client):
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="messages must hold at least one message"):
        client.chat.completions.create(model=MODEL, messages=[])
    with pytest.raises(openai.UnprocessableEntityError, match="messages.0.role"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "robot", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="cache must be one of"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                       extra_body={"cache": "paged"})
    with pytest.raises(openai.BadRequestError, match="'suffix' is not a parameter qdllm takes"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                       extra_body={"suffix": "x"})
    with pytest.raises(openai.BadRequestError, match=r"must not hold the mask token \(id 3, at token \d+\)") as e:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Fill <|mdm_mask|> in"}])
    assert e.value.body["param"] == "messages"


def test_openai_bookkeeping_fields_and_echoed_messages_are_accepted(client, llm):
    """Fields that change nothing here are dropped, neutral values of unsupported ones pass, and an assistant
    message sent back as the client got it (with `refusal` and `annotations`) is read for its content."""
    reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Who is there?"}],
                                           max_tokens=8, user="u1", store=False, metadata={"k": "v"},
                                           parallel_tool_calls=False, tool_choice="none",
                                           extra_body={"best_of": 1, "alg_temp": 0.0, "schedule": "linear"})
    messages = [{"role": "user", "content": "Who is there?"}, reply.choices[0].message.model_dump(),
                {"role": "user", "content": "Speak."}]
    assert "refusal" in messages[1]
    again = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8)
    expected = llm.chat([{"role": m["role"], "content": m["content"]} for m in messages],
                        SamplingParams(max_tokens=8))[0]
    assert again.choices[0].message.content == expected.text


@pytest.mark.parametrize("extra,error,message", [
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}]}]},
     openai.BadRequestError, r"messages.0.content.0: content parts of type 'image_url' are not supported"),
    ({"messages": [{"role": "user", "content": [{"type": "text"}]}]},
     openai.BadRequestError, r"messages.0.content.0.text is required"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}]},
     openai.BadRequestError, r"messages.1.tool_calls is not supported"),
    ({"tool_choice": "required"}, openai.BadRequestError, r"'tool_choice' is not supported"),
    ({"max_completion_tokens": 0}, openai.BadRequestError, "max_completion_tokens must be"),
    ({"stop": ""}, openai.BadRequestError, r"stop must be .*, got an empty string"),
    ({"messages": ["hi"]}, openai.UnprocessableEntityError, 'messages.0 must be an object, got "hi"'),
    ({"stream_options": "yes"}, openai.UnprocessableEntityError, r"stream_options must be an object"),
    ({"stream_options": {"include_usage": True}}, openai.BadRequestError,
     r"stream_options is only allowed when stream is true"),
    ({"messages": [{"role": "user"}]}, openai.BadRequestError, r"messages.0.content is required in a 'user' message"),
    ({"max_tokens": 8, "max_completion_tokens": 16}, openai.BadRequestError,
     r"max_tokens \(8\) and max_completion_tokens \(16\) disagree"),
])
def test_bad_chat_fields_are_named_as_sent(client, extra, error, message):
    kw = {"messages": [{"role": "user", "content": "hi"}]} | extra
    with pytest.raises(error, match=message):
        client.chat.completions.create(model=MODEL, **kw)


def test_auth_and_unknown_routes(server):
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        r = httpx.get(server.url + "/v1/models", headers=headers)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    r = httpx.get(server.url + "/v1/nothing", headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 404 and r.json()["error"]["message"] == "no such endpoint"
    r = httpx.get(server.url + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 405 and r.headers["allow"] == "POST"
    assert r.json()["error"]["message"] == "GET is not allowed on /v1/completions; use POST"
    assert httpx.get(server.url + "/health").status_code == 200  # outside /v1: no key needed


def test_disconnect_mid_stream_cancels_the_request(server):
    def aborted() -> float:
        line = next(x for x in httpx.get(server.url + "/metrics").text.splitlines()
                    if x.startswith("qdllm_aborted_requests_total"))
        return float(line.split()[-1])

    before = aborted()
    body = {"model": MODEL, "prompt": "KING.\n", "max_tokens": 240, "block_length": 8, "stream": True,
            "ignore_eos": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}) as r:
        first = next(r.iter_lines())
        assert first.startswith("data: ")
    deadline = time.time() + 30
    while aborted() == before and time.time() < deadline:
        time.sleep(0.1)
    assert aborted() == before + 1


def test_leaving_clients_and_template_refusals_leave_no_traceback(tmp_path):
    """A client that leaves mid-upload or before its answer, and a chat template's raise_exception, are no
    server errors: no traceback in the log, and the server keeps serving."""
    model = Path(shutil.copytree(ASSET, tmp_path / "model", ignore=shutil.ignore_patterns("data")))
    config = json.loads((model / "tokenizer_config.json").read_text())
    config["chat_template"] = ("{% for m in messages %}{% if m['role'] == 'tool' %}{{ raise_exception('tool "
                               "messages are not supported') }}{% endif %}{% if m['role'] == 'system' %}"
                               "{{ m['content'] + 5 }}{% endif %}{{ m['content'] }}\n{% endfor %}")
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    s = Server(model, "--served-model-name", "m")
    try:
        with socket.create_connection(("127.0.0.1", s.port)) as sock:  # announces 100 bytes, sends 10, leaves
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"model\": ")
            time.sleep(0.5)
        with pytest.raises(httpx.ReadTimeout):
            body = {"model": "m", "prompt": "KING.\n", "max_tokens": 240, "block_length": 8, "ignore_eos": True}
            httpx.post(s.url + "/v1/completions", json=body, timeout=0.5)
        r = httpx.post(s.url + "/v1/chat/completions", json={"model": "m", "messages": [
            {"role": "user", "content": "hi"}, {"role": "tool", "content": "42"}]})
        assert r.status_code == 400 and r.json()["error"]["param"] == "messages", r.text
        assert "tool messages are not supported" in r.json()["error"]["message"]
        r = httpx.post(s.url + "/v1/chat/completions", json={"model": "m", "messages": [  # a broken template: a 500
            {"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]})  # that says why
        assert r.status_code == 500 and r.json()["error"]["message"].startswith(
            "the model's chat template fails on these messages (TypeError: "), r.text
        r = httpx.post(s.url + "/v1/completions", json={"model": "m", "prompt": "KING.\n", "max_tokens": 8}, timeout=60)
        assert r.status_code == 200 and r.json()["choices"][0]["text"]
        time.sleep(1)  # the abandoned request's cancellation is logged, if at all, after it ends
    finally:
        code, log = s.stop()
    assert code == 0 and "Traceback" not in log, log


def test_an_unexpected_error_is_a_500_and_is_counted():
    """A handler that fails where nothing expects it gets the catch-all 500, which Starlette answers outside the
    middleware that counts requests: it was missing from qdllm_requests_total."""
    boom = ("from qdllm.server import app, cli\n"  # qdllm-serve whose requests fail once they are parsed
            "def boom(*_):\n    raise RuntimeError('boom')\n"
            "app.sampling_params = boom\ncli.main()\n")
    s = Server(ASSET, "--served-model-name", "m", serve=(sys.executable, "-c", boom))
    try:
        r = httpx.post(s.url + "/v1/completions", json={"model": "m", "prompt": "KING.\n", "max_tokens": 8})
        metrics = httpx.get(s.url + "/metrics").text
    finally:
        code, log = s.stop()
    assert r.status_code == 500, r.text
    assert r.json() == {"error": {"message": "internal error: RuntimeError", "type": "internal_server_error",
                                  "param": None, "code": 500}}
    assert 'qdllm_requests_total{endpoint="/v1/completions",status="500"} 1\n' in metrics
    assert code == 0 and "RuntimeError: boom" in log and log.count("Traceback") == 1, log  # logged once


def test_32_concurrent_streams_complete_with_correct_usage(server, llm):
    questions = [f"Speak, {name}." for name in ("Hamlet", "Horatio", "Brutus", "Viola")] * 8

    async def one(client, i, q):
        stream = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": q}], max_tokens=24, stream=True,
            stream_options={"include_usage": True}, extra_body={"block_length": 8, "cache": "prefix"})
        text, usage = "", None
        async for c in stream:
            text += "".join(ch.delta.content or "" for ch in c.choices)
            usage = c.usage or usage
        return text, usage

    async def main():
        async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0) as client:
            return await asyncio.gather(*(one(client, i, q) for i, q in enumerate(questions)))

    results = asyncio.run(main())
    refs = {q: llm.chat([{"role": "user", "content": q}], SamplingParams(max_tokens=24, block_length=8,
                                                                         cache="prefix"))[0] for q in set(questions)}
    for q, (text, usage) in zip(questions, results):
        ref = refs[q]
        assert text == ref.text
        assert usage.completion_tokens == len(ref.token_ids) and usage.prompt_tokens == len(ref.prompt_token_ids)
    assert httpx.get(server.url + "/health").status_code == 200


def test_full_queue_gets_503_with_retry_after_and_sigint_stops_cleanly(llada_dir):
    s = Server(llada_dir, "--max-batch", "1", "--max-queue", "1", "--served-model-name", "tiny")
    body = {"model": "tiny", "prompt": [5, 6, 7], "max_tokens": 96, "block_length": 8, "ignore_eos": True}

    async def main():
        async with httpx.AsyncClient(base_url=s.url, timeout=60) as c:
            return await asyncio.gather(*(c.post("/v1/completions", json=body) for _ in range(6)))

    try:
        responses = asyncio.run(main())
        codes = [r.status_code for r in responses]
        busy = [r for r in responses if r.status_code == 503]
    finally:
        code, log = s.stop(signal.SIGINT)
    assert set(codes) <= {200, 503} and 200 in codes and 503 in codes
    assert busy and all(r.headers["retry-after"] == "1" and "queue is full" in r.json()["error"]["message"]
                        for r in busy)
    assert code == 0 and "Traceback" not in log


@pytest.mark.parametrize("args,message", [(["/no/such/model"], "/no/such/model: not found"),
                                          ([str(ASSET), "--port", "http"], "--port must be an integer"),
                                          ([str(ASSET), "--served-model-name", " "], "--served-model-name must be"),
                                          ([str(ASSET), "--device", "tpu"], "--device must be cpu, cuda or cuda:N"),
                                          ([str(ASSET), "--max-batch", "0"], "--max-batch must be"),
                                          ([str(ASSET), "--device", "cpu", "--cuda-graphs"],
                                           "--cuda-graphs needs a CUDA device; the device is cpu"),
                                          ([str(ASSET), "--kv-cache-memory", "lots"],
                                           "--kv-cache-memory must be a size such as 2GiB"),
                                          ([str(ASSET), "--device", "cpu", "--kv-cache-memory", "1MiB"],
                                           ("--kv-cache-memory: 1048576 bytes hold 48 positions (18432 bytes each, "
                                            "in pages of 16, plus one scratch position); a default request")),
                                          ([str(ASSET), "--device", "cpu", "--chat-template", "/no/such.jinja"],
                                           "/no/such.jinja: the chat template does not read (No such file")])
def test_bad_cli_input_is_one_line(args, message):
    r = subprocess.run([SERVE, *args], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_serves_a_converted_artifact_with_its_default_settings(tmp_path, shipped_artifact):
    """The 2-bit artifact of the shipped model; settings a request leaves out come from its manifest."""
    art = Path(shutil.copytree(shipped_artifact, tmp_path / "shakespeare-2bit"))
    manifest = json.loads((art / "qdllm.json").read_text())
    manifest["generation"].update(block_length=8, cache="dual", threshold=0.5)
    (art / "qdllm.json").write_text(json.dumps(manifest))
    # fp32 K and V of 6 layers x 6 heads x 64 dims: 18432 bytes a position; 13 pages of 16 positions, the scratch
    s = Server(art, "--kv-cache-memory", str(209 * 18432))
    try:
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0)
        models = client.models.list().data
        assert [m.id for m in models] == ["shakespeare-2bit"] and models[0].max_model_len == 208
        messages = [{"role": "user", "content": "Who is there?"}]
        chunks = client.chat.completions.create(model="shakespeare-2bit", messages=messages, max_tokens=32,
                                                stream=True)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        # A request's factor replaces the default threshold, where both would be refused.
        factor = client.chat.completions.create(model="shakespeare-2bit", messages=messages, max_tokens=32,
                                                extra_body={"factor": 1.0})
    finally:
        code, log = s.stop()
    llm = LLM(art, device="cpu", dtype=torch.float32)
    by_threshold = llm.chat(messages, SamplingParams(max_tokens=32, block_length=8, cache="dual", threshold=0.5))[0]
    assert text == by_threshold.text and text
    by_factor = llm.chat(messages, SamplingParams(max_tokens=32, block_length=8, cache="dual", factor=1.0))[0]
    assert factor.choices[0].message.content == by_factor.text != by_threshold.text
    assert code == 0 and "Traceback" not in log
    assert "KV pool: 208 positions in pages of 16, 0.00359 GiB, allocated; max_model_len 208" in log


LONG = {"max_tokens": 200, "steps": 200, "block_length": 200, "ignore_eos": True}  # seconds on the CPU


async def running(c: httpx.AsyncClient, n: int) -> None:
    """Wait until the engine denoises n requests (a bounded number of polls, so a broken server fails the test
    instead of hanging it)."""
    for _ in range(1200):
        if f"qdllm_running_requests {n}\n" in (await c.get("/metrics")).text:
            return
        await asyncio.sleep(0.05)
    pytest.fail(f"the engine never ran {n} requests at once")


def unfinished_body(url: str) -> socket.socket:
    """A completion request whose body stops halfway."""
    body = json.dumps({"model": MODEL, "prompt": "ROMEO:"}).encode()
    port = int(url.rsplit(":", 1)[1])
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body[:10]))
    return sock


def response_head(sock: socket.socket) -> tuple[int, dict]:
    sock.settimeout(30)
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    return int(head.split()[1]), json.loads(body)


@pytest.mark.parametrize("signals, flags", [
    ((signal.SIGTERM,), ("--shutdown-timeout", "0")),
    ((signal.SIGINT, signal.SIGINT), ("--shutdown-timeout", "600")),  # the second Ctrl+C ends them at once
])
def test_shutdown_ends_the_requests_still_running_with_503_and_exits_0(signals, flags):
    """uvicorn cancelled the handlers still running at its graceful timeout: plain requests got a text/plain 500,
    streams were cut without an error event, and the log held a traceback per request; after a second Ctrl+C
    the interpreter exited under the engine thread (SIGABRT, exit -6)."""
    s = Server(ASSET, *flags)
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "Speak."}], "stream": True, **LONG}

    async def main():
        async with httpx.AsyncClient(base_url=s.url, timeout=120) as c:
            plain = asyncio.ensure_future(c.post("/v1/completions", json={"model": MODEL, "prompt": "ROMEO:", **LONG}))

            async def stream():
                async with c.stream("POST", "/v1/chat/completions", json=chat) as r:
                    return r.status_code, [line async for line in r.aiter_lines() if line.startswith("data: ")]

            streamed = asyncio.ensure_future(stream())
            await running(c, 2)
            half = unfinished_body(s.url)
            await asyncio.sleep(0.5)  # its handler waits for the rest
            for sig in signals:
                s.proc.send_signal(sig)
                await asyncio.sleep(0.5)
            return await plain, await streamed, await asyncio.to_thread(response_head, half)

    try:
        plain, (status, events), (half_status, half_body) = asyncio.run(main())
        log, _ = s.proc.communicate(timeout=60)
    finally:
        s.stop()
    assert plain.status_code == 503 and plain.json()["error"]["message"] == "the server is shutting down; retry later"
    assert status == 200 and json.loads(events[-1].removeprefix("data: "))["error"]["code"] == 503
    assert half_status == 503 and half_body["error"]["message"] == "the server is shutting down; retry later"
    assert s.proc.returncode == 0 and "Traceback" not in log and "Cancel" not in log, log


def test_shutdown_lets_requests_in_flight_finish_first():
    s = Server(ASSET, "--shutdown-timeout", "600")
    body = {"model": MODEL, "prompt": "ROMEO:", "max_tokens": 24, "block_length": 8, "stream": True}
    try:
        with httpx.stream("POST", s.url + "/v1/completions", json=body, timeout=120) as r:
            lines = (line for line in r.iter_lines() if line.startswith("data: "))
            events = [next(lines)]
            s.proc.send_signal(signal.SIGTERM)
            events += list(lines)
        log, _ = s.proc.communicate(timeout=60)
    finally:
        s.stop()
    assert events[-1] == "data: [DONE]" and json.loads(events[-2].removeprefix("data: "))["choices"][0][
        "finish_reason"] == "length"
    assert s.proc.returncode == 0 and "Traceback" not in log, log


def test_a_late_body_gets_408_and_its_neighbours_are_served():
    """A body that stopped halfway held its connection and handler for ever."""
    s = Server(ASSET, "--body-timeout", "1")
    try:
        half = unfinished_body(s.url)
        r = httpx.post(s.url + "/v1/completions", json={"model": MODEL, "prompt": "ROMEO:", "max_tokens": 4},
                       timeout=60)
        status, body = response_head(half)
    finally:
        code, log = s.stop()
    assert r.status_code == 200
    assert status == 408 and body["error"]["message"] == "the request body did not arrive within 1 s"
    assert code == 0 and "Traceback" not in log


def test_a_body_of_more_json_values_than_any_request_can_hold_is_refused_before_parsing(server):
    """A 7 MB body of a million small prompts took 1.8 s to parse, with the event loop and so every other
    request blocked; a few at once stalled the server for 20 s, and each was refused only after that."""
    body = json.dumps({"model": MODEL, "prompt": [[5, 6, 7]] * 600_000}).encode()  # 6.6 MB, below the limit
    r = httpx.post(server.url + "/v1/completions", content=body, headers={"Authorization": f"Bearer {KEY}",
                                                                          "Content-Type": "application/json"})
    assert r.status_code == 413, r.text
    assert r.json()["error"]["message"] == ("the request body holds about 2400002 JSON values; no request this "
                                            "server can run holds more than 45056")


def values_in(obj) -> int:
    """What `json_values` counts, from the parsed document: each element of a container, and each empty one."""
    if isinstance(obj, list):
        return max(1, len(obj)) + sum(values_in(v) for v in obj)
    if isinstance(obj, dict):
        return max(1, len(obj)) + sum(values_in(v) for v in obj.values())
    return 0


@pytest.mark.parametrize("doc", [
    {"prompt": [[1, 2, 3], [4], []], "stop": ["a,b", "[", "{"]},
    {"messages": [{"role": "user", "content": 'say "[1, 2]", then \\ and \\" and {x: [y]}'}], "n": 2},
    {"prompt": "\\\\\\\"[,]\\", "logit_bias": {"5": 1, "6": -1}, "x": {}},
    {"prompt": "é ü 中文 \u2028 , [ ] { }", "nested": [[[[]]]], "e": [{}]},
])
def test_json_values_counts_outside_strings_only(doc):
    for text in (json.dumps(doc), json.dumps(doc, ensure_ascii=False), json.dumps(doc, separators=(",", ":"))):
        assert json_values(text.encode()) == values_in(doc)
