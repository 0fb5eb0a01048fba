"""Tokenizers through transformers' AutoTokenizer, without ever running code shipped in a checkpoint."""
from __future__ import annotations

import json
import warnings
from contextlib import contextmanager
from pathlib import Path

from jinja2 import TemplateError, TemplateSyntaxError
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast, Qwen2Tokenizer
from transformers.utils import logging as hf_logging

from .errors import CheckpointError

# End-of-turn tokens that end an answer as EOS does (LLaDA-Instruct: <|eot_id|>; Dream/Qwen chat: <|im_end|>).
END_OF_TURN = ("<|eot_id|>", "<|im_end|>")
# A tokenizer's vocabulary: a fast tokenizer's JSON, a SentencePiece model, or a BPE vocabulary (Qwen2).
VOCAB_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


def load_tokenizer(path: str | Path, chat_template: str | Path | None = None) -> PreTrainedTokenizerBase:
    """AutoTokenizer with trust_remote_code=False. A checkpoint whose tokenizer_config names its own code
    (Dream's `auto_map`) gets the stock class that code wraps: a fast tokenizer from tokenizer.json, or a
    Qwen2 BPE from vocab.json and merges.txt. `chat_template`: a Jinja file that replaces the tokenizer's
    template (a base model has none, and chat then falls back to `role: content` lines)."""
    path = Path(path)
    if not any((path / name).is_file() for name in VOCAB_FILES):  # transformers' own message names no file
        raise CheckpointError(f"{path}: tokenizer does not load (no {', '.join(VOCAB_FILES[:-1])} or "
                              f"{VOCAB_FILES[-1]})")
    tokenizer = _load(path)
    template_file = path / "chat_template.jinja"
    if chat_template is not None:
        template_file = Path(chat_template)
        try:
            tokenizer.chat_template = template_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            reason = "not UTF-8 text" if isinstance(e, UnicodeDecodeError) else e.strerror or type(e).__name__
            raise CheckpointError(f"{template_file}: the chat template does not read ({reason})") from None
        if not tokenizer.chat_template.strip():  # falsy: chat would quietly use neither it nor the tokenizer's
            raise CheckpointError(f"{template_file}: the chat template is empty")
    elif not template_file.is_file():
        template_file = path / "tokenizer_config.json"
    if tokenizer.chat_template:  # a template that does not compile would fail every chat request
        try:
            tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                          add_generation_prompt=True)
        except TemplateSyntaxError as e:
            error = f"line {e.lineno}: {e.message}"
            raise CheckpointError(f"{template_file}: the chat template does not compile ({error})") from None
        except TemplateError:  # raise_exception and the like: a matter for each request, not for loading
            pass
        except Exception as e:  # a broken template (a TypeError, say) would fail every chat request
            error = f"{type(e).__name__}: {e}".splitlines()[0]
            raise CheckpointError(f"{template_file}: the chat template fails on a one-message conversation "
                                  f"({error})") from None
    return tokenizer


def _load(path: Path) -> PreTrainedTokenizerBase:
    with _quiet():
        try:
            return AutoTokenizer.from_pretrained(str(path), trust_remote_code=False, local_files_only=True)
        except Exception as e:  # transformers raises many types; the user needs one line
            first_error = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
        if _names_own_code(path):
            stock = PreTrainedTokenizerFast if (path / "tokenizer.json").exists() else Qwen2Tokenizer
            try:
                return stock.from_pretrained(str(path), local_files_only=True)
            except Exception:
                pass
    raise CheckpointError(_bad_json(path) or _lacks_tokenizer_json(path) or
                          f"{path}: tokenizer does not load ({first_error})")


def _bad_json(path: Path) -> str | None:
    """The tokenizer's JSON file that is not a JSON object, if one is: transformers' errors do not name it."""
    for name in ("tokenizer_config.json", "tokenizer.json", "special_tokens_map.json"):
        file = path / name
        if not file.exists():
            continue
        try:
            if isinstance(json.loads(file.read_text(encoding="utf-8")), dict):
                continue
        except (OSError, ValueError):  # UnicodeDecodeError and JSONDecodeError are ValueErrors
            pass
        return f"{file}: unreadable (expected a JSON object)"
    return None


@contextmanager
def _quiet():
    """AutoTokenizer reads config.json too and warns that `llada`/`Dream` are unknown to transformers."""
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(level)


def _tokenizer_config(path: Path) -> dict:
    try:
        config = json.loads((path / "tokenizer_config.json").read_text())
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


def _names_own_code(path: Path) -> bool:
    return "auto_map" in _tokenizer_config(path)


def _lacks_tokenizer_json(path: Path) -> str | None:
    """transformers' generic fast class reads tokenizer.json alone; without it, it tries converters whose errors
    name packages (tiktoken, sentencepiece) that would not help."""
    generic = _tokenizer_config(path).get("tokenizer_class") == "PreTrainedTokenizerFast"
    if not generic or (path / "tokenizer.json").is_file():
        return None
    return f"{path / 'tokenizer.json'}: not found (tokenizer_config.json names PreTrainedTokenizerFast, which reads it)"


def check_vocab(tokenizer: PreTrainedTokenizerBase, vocab_size: int, path: str | Path) -> None:
    """Every id the tokenizer can produce must index the model's embedding; else the first text that meets
    one fails deep inside torch."""
    top = max(tokenizer.get_vocab().values(), default=-1)
    if top >= vocab_size:
        raise CheckpointError(f"{path}: the tokenizer has token id {top}, but config.json's vocabulary holds "
                              f"{vocab_size} ids (the tokenizer does not belong to this model)")


def end_token_ids(tokenizer: PreTrainedTokenizerBase, config_eos: tuple[int, ...]) -> frozenset[int]:
    """Every token id that ends an answer: the config's EOS ids, the tokenizer's EOS, and end-of-turn tokens."""
    ids = set(config_eos)
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    vocab = tokenizer.get_vocab()
    ids.update(vocab[t] for t in END_OF_TURN if t in vocab)
    return frozenset(ids)


def chat_prompt(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]]) -> list[int]:
    """Token ids for a conversation: the tokenizer's chat template when it has one, else `role: content` lines."""
    if tokenizer.chat_template:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
    return tokenizer(text)["input_ids"]
