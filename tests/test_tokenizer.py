"""Tokenizers load through AutoTokenizer, and never through code shipped in a checkpoint."""
import json
import shutil
from pathlib import Path

import pytest
from tiny import write_checkpoint

from qdllm.engine import LLM, CheckpointError, SamplingParams, load_tokenizer
from qdllm.engine.tokenizer import chat_prompt, end_token_ids

ASSET = Path(__file__).parents[1] / "assets" / "llada-shakespeare"


def test_autotokenizer_round_trip(llada_dir):
    tok = load_tokenizer(llada_dir)
    assert tok("w1 w2 w3")["input_ids"] == [1, 2, 3]
    assert tok.decode([1, 2, 125, 126], skip_special_tokens=True) == "w1 w2"
    assert end_token_ids(tok, (125,)) == {125, 122}  # EOS and <|eot_id|>


def test_tokenizer_config_naming_its_own_code_gets_the_stock_class(tmp_path, dream_dir):
    """Dream's tokenizer_config points at tokenization_dream.py; qdllm never runs it."""
    path = shutil.copytree(dream_dir, tmp_path / "dream")
    cfg = json.loads((path / "tokenizer_config.json").read_text())
    cfg["tokenizer_class"] = "DreamTokenizer"
    cfg["auto_map"] = {"AutoTokenizer": ["tokenization_dream.DreamTokenizer", None]}
    (path / "tokenizer_config.json").write_text(json.dumps(cfg))
    (path / "tokenization_dream.py").write_text("raise SystemExit('checkpoint code ran')\n")
    tok = load_tokenizer(path)
    assert tok("w1 w2")["input_ids"] == [1, 2] and tok.chat_template


def test_chat_without_template_uses_role_lines(tmp_path):
    path = write_checkpoint(tmp_path, "llada")
    cfg = json.loads((path / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (path / "tokenizer_config.json").write_text(json.dumps(cfg))
    (path / "chat_template.jinja").unlink(missing_ok=True)
    tok = load_tokenizer(path)
    assert not tok.chat_template
    assert chat_prompt(tok, [{"role": "user", "content": "w3"}]) == tok("user: w3\nassistant:")["input_ids"]


def test_llm_generate_accepts_strings(llada_dir):
    llm = LLM(llada_dir, device="cpu")
    out = llm.generate(["w3 w4", "w5"], SamplingParams(max_tokens=8, ignore_eos=True))
    assert [o.prompt_token_ids for o in out] == [[3, 4], [5]] and all(len(o.token_ids) == 8 for o in out)


def test_missing_tokenizer_is_one_line(tmp_path):
    path = write_checkpoint(tmp_path, "llada", tokenizer=False)
    with pytest.raises(CheckpointError, match="tokenizer does not load"):
        load_tokenizer(path)


def test_a_fast_tokenizer_without_its_json_names_the_file(tmp_path):
    """Without tokenizer.json, transformers' converters failed asking for tiktoken, which would not help."""
    path = tmp_path / "model"
    path.mkdir()
    for name in ("config.json", "tokenizer.model", "tokenizer_config.json"):
        shutil.copy(ASSET / name, path / name)
    with pytest.raises(CheckpointError, match=rf"^{path / 'tokenizer.json'}: not found \(tokenizer_config.json names "
                                              r"PreTrainedTokenizerFast, which reads it\)$"):
        load_tokenizer(path)


def test_a_chat_template_file_replaces_the_tokenizers(tmp_path, llada_dir):
    """A base model's missing template, or any other, is replaced by --chat-template's file."""
    template = tmp_path / "plain.jinja"
    template.write_text("{% for m in messages %}{{ m['content'] }} {% endfor %}{% if add_generation_prompt %}w9"
                        "{% endif %}")
    tok = load_tokenizer(llada_dir, template)
    messages = [{"role": "system", "content": "w2"}, {"role": "user", "content": "w3 w4"}]
    assert chat_prompt(tok, messages) == [2, 3, 4, 9]
    llm = LLM(llada_dir, device="cpu", chat_template=template)
    assert llm.chat(messages, SamplingParams(max_tokens=4, ignore_eos=True))[0].prompt_token_ids == [2, 3, 4, 9]


def test_a_bad_chat_template_file_is_one_line(tmp_path, llada_dir):
    broken = tmp_path / "broken.jinja"
    broken.write_text("w1\n{% for m in messages %}{{ m['content'] }")
    with pytest.raises(CheckpointError, match=rf"^{broken}: the chat template does not compile \(line 2: "):
        load_tokenizer(llada_dir, broken)
    missing = tmp_path / "missing.jinja"
    with pytest.raises(CheckpointError, match=rf"^{missing}: the chat template does not read \(No such file"):
        LLM(llada_dir, device="cpu", chat_template=missing)
    binary = tmp_path / "binary.jinja"
    binary.write_bytes(b"\xff\xfe{{ x }}")
    with pytest.raises(CheckpointError, match=rf"^{binary}: the chat template does not read \(not UTF-8 text\)$"):
        load_tokenizer(llada_dir, binary)
    empty = tmp_path / "empty.jinja"
    empty.write_text(" \n")  # was taken as no template: chat used neither it nor the tokenizer's
    with pytest.raises(CheckpointError, match=rf"^{empty}: the chat template is empty$"):
        load_tokenizer(llada_dir, empty)
    typed = tmp_path / "typed.jinja"
    typed.write_text("{{ messages[0]['content'] + 5 }}")  # served, it failed every chat request with a 500
    with pytest.raises(CheckpointError, match=rf"^{typed}: the chat template fails on a one-message conversation "
                                              r"\(TypeError: .*\)$"):
        load_tokenizer(llada_dir, typed)
