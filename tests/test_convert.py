"""qdllm-convert end to end on tiny real-format checkpoints: the artifact, its loading, --resume, refusals."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny import write_checkpoint

from qdllm.engine import CheckpointError, load_model
from qdllm.engine.artifact import MANIFEST, sha256_file
from qdllm.kernels.reference import dequantize
from qdllm.quantizer import artifact as artifact_module
from qdllm.quantizer.cli import main

BASE = ["--block-size", "32", "--nsamples", "8", "--seqlen", "32", "--batch-size", "4", "--device", "cpu"]


def calib_file(path):
    gen = torch.Generator().manual_seed(0)
    path.write_text(" ".join(f"w{i}" for i in torch.randint(0, 120, (600,), generator=gen).tolist()))
    return path


def convert(src, out, calib, *extra):
    main([str(src), str(out), "--calib", str(calib), *BASE, *extra])
    return out


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("src"), "llada", dtype=torch.bfloat16)


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    return calib_file(tmp_path_factory.mktemp("calib") / "calib.txt")


@pytest.fixture(scope="module")
def art(src, calib, tmp_path_factory):
    return convert(src, tmp_path_factory.mktemp("art") / "out", calib, "--abmp-ratio", "0.5")


def ids():
    x = torch.randint(0, 120, (2, 24), generator=torch.Generator().manual_seed(5))
    x[:, 12:] = 126
    return x


def test_artifact_layout_and_manifest(art, src):
    m = json.loads((art / MANIFEST).read_text())
    assert m["format_version"] == 1 and m["quantization"]["method"] == "quant-dllm"
    assert m["quantization"]["refine_rounds"] == 3 and m["quantization"]["naive_daq"] is False
    assert m["calibration"]["mcs"] is True and m["calibration"]["mcs_prefix_ratio"] == 0.25
    assert (art / "config.json").read_bytes() == (src / "config.json").read_bytes()
    assert (art / "tokenizer.json").exists() and (art / "tokenizer_config.json").exists()
    assert sorted(m["shards"]) == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert all(sha256_file(art / n) == h for n, h in m["shards"].items())
    # ABMP at 0.5: K=64 has 2 blocks -> orders 1 and 3; K=96 has 3 -> 1, 2, 3. Per layer: q,k,v,o,gate,up
    # have K=64 (6 linears x {1, 3}) and down has K=96.
    for layer in m["layers"]:
        assert layer["orders"] == {"1": 7, "2": 1, "3": 7}
        assert layer["linears"]["down_proj"]["orders"] == {"1": 1, "2": 1, "3": 1}
        assert 0 < layer["relative_error"] < 1
    # Every stored bit: per plane N·G signs and N + G fp16 scales, plus plane_ptr; tiny N makes scales costly.
    shapes = [(64, 64)] * 4 + [(96, 64)] * 2 + [(64, 96)]  # q k v o gate up (N, K), down
    bits = sum(2 * (N * 32 + 16 * (N + 32)) * (K // 32) + 32 * (K // 32 + 1) for N, K in shapes)
    assert m["effective_bits"] == pytest.approx(bits / sum(N * K for N, K in shapes))


def test_artifact_logits_equal_the_dequantized_dense_model(art, src):
    q = load_model(art, dtype=torch.float32, backend="torch")
    dense = load_model(src, dtype=torch.float32)
    for i, layer in enumerate(q.layers):
        for name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
            module = getattr(layer, name)
            assert type(module).__name__ == "QuantLinear"
            getattr(dense.layers[i], name).weight.data = dequantize(module.weight_packed, torch.float32)
    torch.testing.assert_close(q(ids()), dense(ids()), rtol=1e-5, atol=1e-5)


def test_triton_backend_gives_the_torch_backend_logits(art):
    """Under TRITON_INTERPRET=1 on the CPU (tests/conftest.py), on a GPU for real."""
    pytest.importorskip("triton")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x = ids()[:1, 4:20].to(device)  # 16 tokens: small, since the interpreter is slow
    ref = load_model(art, device=device, dtype=torch.float16, backend="torch")(x).float()
    out = load_model(art, device=device, dtype=torch.float16, backend="triton")(x).float()
    assert ((out - ref).norm() / ref.norm()).item() < 2e-3


def test_quantized_model_stays_close_to_the_original(art, src):
    ref = load_model(src, dtype=torch.float32)(ids())
    out = load_model(art, dtype=torch.float32)(ids())
    assert ((out - ref).norm() / ref.norm()).item() < 0.6


def test_resume_after_an_interrupted_run_gives_identical_bytes(art, src, calib, tmp_path, monkeypatch):
    out = tmp_path / "resumed"
    real = artifact_module.ArtifactWriter.write_layer

    def crash_after_first_layer(self, index, tensors, record):
        real(self, index, tensors, record)
        raise KeyboardInterrupt

    monkeypatch.setattr(artifact_module.ArtifactWriter, "write_layer", crash_after_first_layer)
    with pytest.raises(SystemExit) as e:
        convert(src, out, calib, "--abmp-ratio", "0.5")
    assert e.value.code == 130 and not (out / MANIFEST).exists()
    monkeypatch.undo()
    with pytest.raises(SystemExit) as e:  # an unfinished conversion is not overwritten without --resume
        convert(src, out, calib, "--abmp-ratio", "0.5")
    assert e.value.code == 2
    with pytest.raises(SystemExit):  # nor resumed with other settings
        convert(src, out, calib, "--abmp-ratio", "0.25", "--resume")
    convert(src, out, calib, "--abmp-ratio", "0.5", "--resume")
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in art.iterdir())
    for p in art.iterdir():
        if p.name == MANIFEST:
            a, b = json.loads(p.read_text()), json.loads((out / p.name).read_text())
            assert a == b
        else:
            assert p.read_bytes() == (out / p.name).read_bytes(), p.name


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_uniform_baselines_are_dense_artifacts(src, calib, tmp_path, method):
    out = convert(src, tmp_path / method, calib, "--method", method)
    m = json.loads((out / MANIFEST).read_text())
    assert m["quantization"]["storage"] == "dense-fp16" and m["effective_bits"] == pytest.approx(2 + 32 / 32)
    model = load_model(out, dtype=torch.float32)
    w = model.layers[0].q_proj.weight
    levels = torch.unique(w[0, :32])
    assert len(levels) <= 4  # a 2-bit group has at most 4 levels
    assert m["calibration"]["mcs"] is (method == "gptq")


def refuse(capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and message in err and "\n" not in err, err


def test_cli_refusals(src, calib, tmp_path, capsys, art):
    out = str(tmp_path / "o")
    refuse(capsys, [str(src), out, *BASE], "--calib FILE is required")
    refuse(capsys, [str(src), out, "--calib", str(calib), "--bits", "3"], "--bits must be 2 for quant-dllm")
    refuse(capsys, [str(src), out, "--calib", str(calib), "--method", "rtn", "--naive-daq"],
           "--naive-daq applies to --method quant-dllm only")
    refuse(capsys, [str(src), out, "--calib", str(calib), "--method", "gptq", "--refine-rounds", "2"],
           "--refine-rounds applies to --method quant-dllm only")
    refuse(capsys, [str(src), out, "--calib", str(calib), "--refine-rounds", "-1"], "--refine-rounds")
    refuse(capsys, [str(src), out, "--calib", str(calib), "--block-size", "48"], "must be a multiple of 32")
    refuse(capsys, [str(src), out, "--calib", str(calib), "--block-size", "128"], "does not divide d_model (64)")
    refuse(capsys, [str(src), out, "--calib", str(calib), "--seqlen", "999"], "--seqlen must be at most")
    refuse(capsys, [str(src), out, "--calib", str(tmp_path / "none.txt"), *BASE], "none.txt: not found")
    refuse(capsys, [str(src), str(art), "--calib", str(calib), *BASE], "a finished artifact")
    refuse(capsys, [str(tmp_path / "nosuch"), out, "--calib", str(calib)], "config.json: not found")


@pytest.fixture
def broken(art, tmp_path):
    out = tmp_path / "broken"
    shutil.copytree(art, out)
    return out


def rewrite_shard(path, change):
    """Edit the first shard and update its hash in the manifest, so only the edit is wrong."""
    name = "model-00001-of-00003.safetensors"
    tensors = load_file(str(path / name))
    change(tensors)
    save_file(tensors, str(path / name))
    m = json.loads((path / MANIFEST).read_text())
    m["shards"][name] = sha256_file(path / name)
    (path / MANIFEST).write_text(json.dumps(m))


Q = "model.transformer.blocks.0.q_proj."


@pytest.mark.parametrize("case,message", [
    ("version", "unknown format_version 99"),
    ("hash", "sha256 does not match qdllm.json"),
    ("missing", f"missing tensor '{Q}alpha_c'"),
    ("shape", f"{Q}alpha_r: expected float16 [4, 64], got float16 [4, 63]"),
    ("order", f"{Q}plane_ptr: block 0 has order 4, expected 1..3"),
])
def test_artifact_refusals(broken, case, message):
    if case == "version":
        m = json.loads((broken / MANIFEST).read_text())
        m["format_version"] = 99
        (broken / MANIFEST).write_text(json.dumps(m))
    elif case == "hash":
        with open(broken / "model-00002-of-00003.safetensors", "r+b") as f:
            f.seek(-1, 2)
            f.write(b"\x00" if f.read(1) != b"\x00" else b"\x01")
    elif case == "missing":
        rewrite_shard(broken, lambda t: t.pop(Q + "alpha_c"))
    elif case == "shape":
        rewrite_shard(broken, lambda t: t.update({Q + "alpha_r": t[Q + "alpha_r"][:, :-1].contiguous()}))
    else:
        def bad_order(t):
            ptr = t[Q + "plane_ptr"].clone()
            ptr[1] = 4
            t[Q + "plane_ptr"] = ptr
        rewrite_shard(broken, bad_order)
    with pytest.raises(CheckpointError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_model(broken)
