"""Every bad checkpoint is refused with one line that names the file and the problem."""
import json
import shutil
import socket
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny import write_checkpoint

from qdllm.engine import LLM, CheckpointError, load_model, read_config
from qdllm.engine.artifact import sha256_file
from qdllm.engine.evaluate import main as eval_main
from qdllm.engine.loader import load_state
from qdllm.server import cli as serve_cli
from qdllm.server.cli import main as serve_main


@pytest.fixture
def ckpt(tmp_path, llada_dir):
    return shutil.copytree(llada_dir, tmp_path / "ckpt")


def refused(path, *fragments: str) -> str:
    with pytest.raises(CheckpointError) as err:
        load_model(path)
    msg = str(err.value)
    assert "\n" not in msg
    for f in fragments:
        assert f in msg, msg
    return msg


def edit_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


def test_not_a_directory(tmp_path):
    refused(tmp_path / "nope", "nope", "not found")
    (tmp_path / "file").write_text("x")
    refused(tmp_path / "file", "file", "not a directory")


def test_missing_config(ckpt):
    (ckpt / "config.json").unlink()
    refused(ckpt, "config.json", "not found")


def test_unreadable_config(ckpt):
    (ckpt / "config.json").write_text("{ not json")
    refused(ckpt, "config.json", "unreadable")


def test_config_nested_too_deeply(ckpt):
    """A RecursionError traceback."""
    (ckpt / "config.json").write_text("[" * 100000 + "]" * 100000)
    refused(ckpt, "config.json: unreadable (nested too deeply)")


def test_config_sizes_beyond_int64(ckpt):
    """A TypeError traceback from torch.empty."""
    edit_config(ckpt, mlp_hidden_size=2**63)
    refused(ckpt, "config.json: sizes too large to build the model")


def test_an_fp8_e4m3_source_is_checked_for_nan(ckpt):
    """torch has no isfinite for float8_e4m3fn: qdllm-convert ended in a traceback before calibrating."""
    cfg = read_config(ckpt)
    shapes = {"embed.weight": torch.Size([cfg.vocab_size, cfg.d_model])}
    state = {k: v.to(torch.float8_e4m3fn) for k, v in load_file(ckpt / "model.safetensors").items()}
    save_file(state, ckpt / "model.safetensors")
    name = next(k for k in state if k.endswith("wte.weight"))  # LLaDA's embedding
    embed = load_state(ckpt, cfg, shapes, torch.float32, "cpu", finite=True)["embed.weight"]
    assert torch.equal(embed, state[name].float())
    state[name][0, 0] = float("nan")
    save_file(state, ckpt / "model.safetensors")
    with pytest.raises(CheckpointError, match=f"tensor '{name}' holds NaN or inf"):
        load_state(ckpt, cfg, shapes, torch.float32, "cpu", finite=True)


def test_a_tensor_in_two_files_without_an_index(ckpt):
    """The last file's copy was taken silently."""
    state = load_file(ckpt / "model.safetensors")
    name = next(iter(sorted(state)))
    save_file({name: state[name]}, ckpt / "zz-extra.safetensors")
    refused(ckpt, f"zz-extra.safetensors: tensor '{name}' is also in model.safetensors; without "
                  "model.safetensors.index.json to choose, each tensor must be in one file")


def test_unknown_model_type(ckpt):
    edit_config(ckpt, model_type="llama")
    refused(ckpt, "config.json", "unknown model_type 'llama'", "llada", "Dream")


def test_missing_required_field(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    del cfg["d_model"]
    (ckpt / "config.json").write_text(json.dumps(cfg))
    refused(ckpt, "config.json", "'d_model'", "missing")


def test_wrongly_typed_field(ckpt):
    edit_config(ckpt, n_layers="two")
    refused(ckpt, "config.json", "'n_layers'", "integer")


def test_unsupported_option_is_refused_not_ignored(ckpt):
    edit_config(ckpt, alibi=True)
    refused(ckpt, "config.json", "'alibi'")


def test_missing_tensor(ckpt):
    tensors = load_file(str(ckpt / "model.safetensors"))
    del tensors["model.transformer.blocks.1.up_proj.weight"]
    save_file(tensors, str(ckpt / "model.safetensors"))
    refused(ckpt, "missing tensor 'model.transformer.blocks.1.up_proj.weight' (expected shape [96, 64])")


def test_misshaped_tensor(ckpt):
    tensors = load_file(str(ckpt / "model.safetensors"))
    tensors["model.transformer.blocks.0.q_proj.weight"] = torch.zeros(64, 63)
    save_file(tensors, str(ckpt / "model.safetensors"))
    refused(ckpt, "model.safetensors", "'model.transformer.blocks.0.q_proj.weight'", "[64, 63]", "[64, 64]")


def test_integer_tensor(ckpt):
    tensors = load_file(str(ckpt / "model.safetensors"))
    tensors["model.transformer.ln_f.weight"] = torch.ones(64, dtype=torch.int32)
    save_file(tensors, str(ckpt / "model.safetensors"))
    refused(ckpt, "'model.transformer.ln_f.weight'", "floating-point")


def test_no_weights(ckpt):
    (ckpt / "model.safetensors").unlink()
    refused(ckpt, "no *.safetensors")


def test_corrupt_safetensors(ckpt):
    (ckpt / "model.safetensors").write_bytes(b"\x00" * 64)
    refused(ckpt, "model.safetensors", "not a readable safetensors file")


def test_index_names_a_missing_shard(tmp_path):
    path = write_checkpoint(tmp_path, "dream", shards=2, tokenizer=False)
    (path / "model-00002-of-00002.safetensors").unlink()
    refused(path, "model-00002-of-00002.safetensors", "not found")


def test_tokenizer_that_does_not_load(ckpt):
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (ckpt / f).unlink()
    with pytest.raises(CheckpointError) as err:
        LLM(ckpt, device="cpu")
    assert "tokenizer does not load" in str(err.value) and str(ckpt) in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("manifest,message", [
    ("{", "qdllm.json: unreadable (expected the JSON manifest of a qdllm artifact)"),
    ("{}", "qdllm.json: unknown format_version None (this qdllm reads 1"),
    ('{"format_version": 1}', "qdllm.json: field 'shards' must map shard file names to sha256 digests"),
    ('{"format_version": 1, "shards": {"model-00001-of-00001.safetensors": "00"}}',
     "model-00001-of-00001.safetensors: missing (listed in qdllm.json)"),
])
def test_bad_artifact_manifests(ckpt, manifest, message):
    (ckpt / "qdllm.json").write_text(manifest)
    refused(ckpt, message)


def test_bad_backend(llada_dir):
    with pytest.raises(ValueError, match="backend"):
        load_model(llada_dir, backend="cuda-magic")


@pytest.mark.parametrize("kwargs,message", [
    ({"device": "tpu"}, "device must be cpu, cuda or cuda:N, got 'tpu'"),
    ({"device": "cuda:99"}, "device 'cuda:99' is not available on this machine"),
    ({"dtype": torch.int8}, "dtype must be a floating-point torch.dtype"),
    ({"dtype": "float16"}, "dtype must be a floating-point torch.dtype"),
])
def test_bad_device_or_dtype(llada_dir, kwargs, message):
    """load_model passed them to torch, which raised RuntimeError, AssertionError or TypeError."""
    with pytest.raises(ValueError) as err:
        load_model(llada_dir, **kwargs)
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("changes,fragments", [
    ({"mask_token_id": 999}, ["'mask_token_id'", "a token id in [0, 128)", "999"]),
    ({"eos_token_id": -1}, ["'eos_token_id'", "[0, 128)", "-1"]),
    ({"eos_token_id": [125, 128]}, ["'eos_token_id'", "[0, 128)"]),
    ({"n_heads": 64, "n_kv_heads": 64}, ["'d_model' / 'n_heads'", "head size, 1", "even"]),
    ({"torch_dtype": "int8"}, ["'torch_dtype'", "'float32', 'float16', 'bfloat16'", "'int8'"]),
    ({"torch_dtype": 5}, ["'torch_dtype'", "got 5"]),
    ({"d_model": 2**62}, ["config.json", "sizes too large to build the model"]),
])
def test_fields_that_would_fail_deep_inside_torch(ckpt, changes, fragments):
    """Token ids beyond the vocabulary, odd head sizes and huge sizes used to pass the config and fail at the
    first forward (IndexError, an unpacking ValueError) or while building the model (RuntimeError)."""
    edit_config(ckpt, **changes)
    refused(ckpt, "config.json", *fragments)


def test_infinite_float_field(ckpt):
    text = (ckpt / "config.json").read_text()
    (ckpt / "config.json").write_text(text.replace('"rope_theta": 500000.0', '"rope_theta": Infinity'))
    refused(ckpt, "config.json", "'rope_theta'", "finite")


def test_config_with_fewer_layers_than_the_weights(ckpt):
    """Layer 1's tensors were silently dropped and a 1-layer model ran."""
    edit_config(ckpt, n_layers=1)
    refused(ckpt, "model.safetensors", "'model.transformer.blocks.1.", "config.json declares only 1 layer(s)")


def test_config_with_more_layers_than_the_weights(ckpt):
    """It failed on the first missing tensor, naming neither count."""
    edit_config(ckpt, n_layers=3)
    refused(ckpt, f"{ckpt}: holds the weights of 2 layer(s), but {ckpt / 'config.json'} declares 3")


def test_a_checkpoint_folder_given_as_a_file(ckpt):
    with pytest.raises(CheckpointError, match="model.safetensors: not a directory"):
        read_config(ckpt / "model.safetensors")


def edit_index(path, change):
    file = path / "model.safetensors.index.json"
    index = json.loads(file.read_text())
    change(index["weight_map"])
    file.write_text(json.dumps(index))


@pytest.fixture
def sharded(tmp_path):
    return write_checkpoint(tmp_path / "sharded", "dream", shards=2, tokenizer=False)


@pytest.mark.parametrize("value", [5, "../model-00001-of-00002.safetensors", "/etc/hostname", "."])
def test_index_entry_that_is_not_a_file_name(sharded, value):
    edit_index(sharded, lambda m: m.update({"lm_head.weight": value}))
    refused(sharded, "model.safetensors.index.json", "weight_map['lm_head.weight'] must name a file in", repr(value))


def test_index_names_the_wrong_shard(sharded):
    """safetensors' own error (SafetensorError: File does not contain tensor) used to escape."""
    other = {"model-00001-of-00002.safetensors": "model-00002-of-00002.safetensors",
             "model-00002-of-00002.safetensors": "model-00001-of-00002.safetensors"}
    edit_index(sharded, lambda m: m.update({"lm_head.weight": other[m["lm_head.weight"]]}))
    refused(sharded, "has no tensor 'lm_head.weight' (named by model.safetensors.index.json)")


def llm_refused(path, *fragments: str) -> None:
    with pytest.raises(CheckpointError) as err:
        LLM(path, device="cpu")
    assert "\n" not in str(err.value)
    for f in fragments:
        assert f in str(err.value), str(err.value)


def test_no_tokenizer_files(ckpt):
    """transformers' own message ("Couldn't instantiate the backend tokenizer from one of: ") names no file."""
    (ckpt / "tokenizer.json").unlink()
    llm_refused(ckpt, str(ckpt), "tokenizer does not load (no tokenizer.json, tokenizer.model or vocab.json)")


@pytest.mark.parametrize("name,text", [("tokenizer_config.json", "[]"), ("tokenizer.json", "{"),
                                       ("tokenizer.json", "")])
def test_corrupt_tokenizer_file_is_named(ckpt, name, text):
    (ckpt / name).write_text(text)
    llm_refused(ckpt, str(ckpt / name), "unreadable (expected a JSON object)")


def test_chat_template_that_does_not_compile(ckpt):
    """It loaded, then every chat request failed."""
    file = ckpt / "tokenizer_config.json"
    cfg = json.loads(file.read_text())
    cfg["chat_template"] = "{% for %}"
    file.write_text(json.dumps(cfg))
    for extra in ckpt.glob("chat_template.jinja"):
        extra.unlink()
    llm_refused(ckpt, "tokenizer_config.json: the chat template does not compile (line 1")


def write_manifest(ckpt, **changes) -> None:
    """The least qdllm.json that makes the dense checkpoint `ckpt` load as an artifact, with `changes`."""
    manifest = {"format_version": 1, "shards": {"model.safetensors": sha256_file(ckpt / "model.safetensors")},
                "source": {"config_sha256": sha256_file(ckpt / "config.json")}, "quantization": {"block_size": 32},
                **changes}
    (ckpt / "qdllm.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("changes,message", [
    ({"format_version": True}, "unknown format_version True"),
    ({"format_version": 1.0}, "unknown format_version 1.0"),
    ({"shards": {"../model.safetensors": "00"}}, "field 'shards' must map shard file names"),
    ({"quantization": []}, "field 'quantization.block_size' must be a positive multiple of 32, got None"),
    ({"quantization": {"block_size": 16}}, "field 'quantization.block_size' must be a positive multiple of 32, got 16"),
])
def test_more_bad_artifact_manifests(ckpt, changes, message):
    """A list for 'quantization' raised AttributeError; true and 1.0 passed as format_version 1."""
    write_manifest(ckpt, **changes)
    refused(ckpt, "qdllm.json", message)


# qdllm-eval and qdllm-serve refuse the same way: one line, exit status 2, before any long work.

@pytest.fixture(autouse=True)
def no_server(monkeypatch):
    """A refusal that does not happen must fail the test, not leave a server running."""
    def run(*args, **kwargs):
        raise AssertionError("qdllm-serve started serving")
    monkeypatch.setattr(serve_cli, "serve", run)


def cli_refused(main, argv, capsys, *fragments: str) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "\n" not in err and "Traceback" not in err, err
    for f in fragments:
        assert f in err, err
    return err


@pytest.fixture
def text_file(tmp_path):
    file = tmp_path / "text.txt"
    file.write_text(" ".join(f"w{i}" for i in range(40)))
    return file


def test_eval_flags_out_of_range(llada_dir, text_file, capsys):
    """A --seed whose per-window seeds overflowed torch's ("Overflow when unpacking long long", naming no
    flag), and an --mc too large for torch.arange (a traceback)."""
    base = [str(llada_dir), "--data", str(text_file), "--device", "cpu"]
    cli_refused(eval_main, [*base, "--seed", str(10**14)], capsys, "--seed must be an integer in [0, 4294967295]")
    cli_refused(eval_main, [*base, "--mc", str(2**64)], capsys, "--mc must be at most 65536")


def test_eval_json_that_cannot_be_written(llada_dir, text_file, tmp_path, capsys):
    """A directory as --json failed with a traceback after the whole evaluation, and the result was lost."""
    base = [str(llada_dir), "--data", str(text_file), "--device", "cpu", "--mc", "2"]
    cli_refused(eval_main, [*base, "--json", str(tmp_path)], capsys, "--json", "is a directory")
    if Path("/dev/full").exists():  # a write that fails only once the evaluation is done
        with pytest.raises(SystemExit) as e:
            eval_main([*base, "--json", "/dev/full"])
        out = capsys.readouterr()
        assert e.value.code == 2 and json.loads(out.out)["tokens"] == 40
        assert out.err.strip().splitlines()[-1].startswith("qdllm-eval: error: --json /dev/full: cannot be written")


def test_eval_json_never_overwrites_its_inputs(ckpt, text_file, capsys):
    """--json naming the data file, or the model's config.json, replaced it with the result."""
    before = text_file.read_bytes(), (ckpt / "config.json").read_bytes()
    base = [str(ckpt), "--data", str(text_file), "--device", "cpu", "--mc", "2", "--json"]
    cli_refused(eval_main, [*base, str(text_file)], capsys, "is the --data file")
    cli_refused(eval_main, [*base, str(ckpt / "sub" / ".." / "config.json")], capsys, "lies in the model folder")
    assert (text_file.read_bytes(), (ckpt / "config.json").read_bytes()) == before


def test_tokenizer_beyond_the_vocabulary_is_refused_by_eval_and_serve(tmp_path, text_file, capsys):
    """Token ids past the embedding raised IndexError inside torch (eval), or refused every request with a
    message that blamed the prompt (serve)."""
    path = write_checkpoint(tmp_path / "small", "llada", embedding_size=120, vocab_size=120, mask_token_id=3,
                            eos_token_id=2)
    message = "the tokenizer has token id 127, but config.json's vocabulary holds 120 ids"
    cli_refused(eval_main, [str(path), "--data", str(text_file), "--device", "cpu", "--mc", "2"], capsys, message)
    cli_refused(serve_main, [str(path), "--device", "cpu", "--port", "0"], capsys, message)


def test_serve_settings_refused_at_start_up(llada_dir, capsys):
    """An empty --api-key turned authentication off; --max-model-len beyond the context was cut to it without
    a word; a huge --max-batch overflowed (a traceback)."""
    base = [str(llada_dir), "--device", "cpu", "--port", "0"]
    cli_refused(serve_main, [*base, "--api-key", ""], capsys, "--api-key must be a non-empty printable string")
    cli_refused(serve_main, [*base, "--max-model-len", "257"], capsys,
                "--max-model-len must be in [1, 256] (the model's context), got 257")
    cli_refused(serve_main, [*base, "--max-batch", str(2**64)], capsys, "--max-batch must be an integer in [1, 65536]")


def test_serve_address_in_use(llada_dir, capsys):
    """uvicorn failed only after the model loaded, in several log lines naming no flag, with exit status 3."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        cli_refused(serve_main, [str(llada_dir), "--device", "cpu", "--port", str(port)], capsys,
                    f"--host 127.0.0.1 --port {port}: cannot bind")


@pytest.mark.parametrize("generation,message", [
    ([1], "field 'generation' must be an object"),
    ({"temperature": -1}, "field 'generation.temperature' must be a number in [0, 1e+300]"),
    ({"max_tokens": 10**9}, "field 'generation.max_tokens': prompt (1 tokens) plus canvas (1000000000: max_tokens "
                            "rounded up to whole blocks) exceeds the model's context of 256 tokens"),
    ({"cfg_scale": 1e39}, "field 'generation.cfg_scale' must be a number in [0, 100], got 1e+39"),
    ({"steppps": 5}, "field 'generation.steppps' is not a default generation setting (expected some of ['max_tokens'"),
    ({"seed": 1}, "field 'generation.seed' is not a default generation setting"),
    ({"alg_temp": 1e-320}, "field 'generation.alg_temp' must be 0 or a number >= 1e-300"),
])
def test_serve_bad_generation_defaults_name_the_manifest(ckpt, capsys, generation, message):
    write_manifest(ckpt, generation=generation)
    cli_refused(serve_main, [str(ckpt), "--device", "cpu", "--port", "0"], capsys, "qdllm.json", message)
