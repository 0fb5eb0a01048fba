"""Every bad checkpoint is refused with one line that names the file and the problem."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny import write_checkpoint

from qdllm.engine import LLM, CheckpointError, load_model


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
    refused(tmp_path / "nope", "nope", "not a directory")


def test_missing_config(ckpt):
    (ckpt / "config.json").unlink()
    refused(ckpt, "config.json", "not found")


def test_unreadable_config(ckpt):
    (ckpt / "config.json").write_text("{ not json")
    refused(ckpt, "config.json", "unreadable")


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
    refused(ckpt, "missing tensor 'model.transformer.blocks.1.up_proj.weight'")


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
