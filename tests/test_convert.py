"""qdllm-convert end to end on tiny real-format checkpoints: the artifact, its loading, --resume, refusals."""
import json
import os
import shutil
import stat

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


@pytest.fixture(scope="module")
def dream_art(calib, tmp_path_factory):
    """Dream's q/k/v have biases, which nn.Linear adds inside the GEMM."""
    src = write_checkpoint(tmp_path_factory.mktemp("dream"), "dream", dtype=torch.bfloat16)
    return convert(src, tmp_path_factory.mktemp("dream-art") / "out", calib)


@pytest.mark.parametrize("family", ["llada", "dream"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dense_backend_gives_the_torch_backend_logits_exactly(request, family, dtype):
    """Dequantized once at load or on every call, the weights are the same bits, so the logits are too."""
    art = request.getfixturevalue("art" if family == "llada" else "dream_art")
    ref = load_model(art, dtype=dtype, backend="torch")
    out = load_model(art, dtype=dtype, backend="dense")
    linears = [m for m in out.layers.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 7 * len(out.layers) and all(m.weight.dtype == dtype for m in linears)
    assert not any(type(m).__name__ == "QuantLinear" for m in out.modules())
    assert torch.equal(out(ids()), ref(ids()))


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


def test_resume_after_an_interrupted_run_gives_identical_bytes(art, src, calib, tmp_path, monkeypatch, capsys):
    """Also when SRC and --calib are spelled another way: relative paths were refused as "different calibration,
    source", naming no value."""
    out = tmp_path / "resumed"
    real = artifact_module.ArtifactWriter.write_layer

    def crash_after_first_layer(self, index, tensors, record):
        real(self, index, tensors, record)
        raise KeyboardInterrupt

    monkeypatch.setattr(artifact_module.ArtifactWriter, "write_layer", crash_after_first_layer)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        main([os.path.relpath(src), "resumed", "--calib", os.path.relpath(calib), *BASE, "--abmp-ratio", "0.5"])
    assert e.value.code == 130 and not (out / MANIFEST).exists()
    monkeypatch.undo()
    with pytest.raises(SystemExit) as e:  # an unfinished conversion is not overwritten without --resume
        convert(src, out, calib, "--abmp-ratio", "0.5")
    assert e.value.code == 2
    capsys.readouterr()
    refuse(capsys, [str(src), str(out), "--calib", str(calib), *BASE, "--abmp-ratio", "0.25", "--seed", "1",
                    "--resume"],  # nor resumed with other settings, which are named
           f"{out}: was started with other settings (calibration.seed was 0, now 1; quantization.abmp_ratio was 0.5, "
           "now 0.25); convert again with the same settings, or remove the directory")
    convert(src, out, calib, "--abmp-ratio", "0.5", "--resume")
    assert "holds no interrupted conversion" not in capsys.readouterr().err
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


def test_a_shard_that_cannot_be_written_is_one_line(src, calib, tmp_path, capsys, monkeypatch):
    """safetensors' SafetensorError (a full disk, a lost permission) is no OSError: it ended in a traceback."""
    def full(tensors, file, metadata=None):
        raise artifact_module.SafetensorError("Error while serializing: I/O error: File too large (os error 27)")

    monkeypatch.setattr(artifact_module, "save_file", full)
    with pytest.raises(SystemExit) as e:
        main([str(src), str(tmp_path / "o"), "--calib", str(calib), *BASE])
    err = capsys.readouterr().err  # after the progress bar, on a line of its own
    assert e.value.code == 2 and "Traceback" not in err
    assert err.splitlines()[-1].endswith("model-00001-of-00003.safetensors.tmp: cannot be written (Error while "
                                         "serializing: I/O error: File too large (os error 27))"), err


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
    ("config", "config.json: sha256 does not match qdllm.json's source.config_sha256"),
    ("extra", f"unexpected tensor '{Q}weight'"),
])
def test_artifact_refusals(broken, case, message):
    """An edited config.json (a head count, the RoPE base) and a tensor the model does not take loaded silently,
    and computed other logits."""
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
    elif case == "config":
        cfg = json.loads((broken / "config.json").read_text())
        cfg["rope_theta"] = 1.0
        (broken / "config.json").write_text(json.dumps(cfg))
    elif case == "extra":
        rewrite_shard(broken, lambda t: t.update({Q + "weight": torch.zeros(64, 64, dtype=torch.float16)}))
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


def test_more_cli_refusals(src, calib, tmp_path, capsys, art):
    """NaN passed the range checks; a huge --seed or --nsamples overflowed inside torch, naming no flag;
    --prefix-ratio was ignored without MCS; an artifact as SRC failed on its first layer."""
    out = str(tmp_path / "o")
    for flag in ("--abmp-ratio", "--prefix-ratio"):
        refuse(capsys, [str(src), out, "--calib", str(calib), *BASE, flag, "nan"], f"{flag} must be a number in")
    refuse(capsys, [str(src), out, "--calib", str(calib), *BASE, "--seed", str(2**64)], "--seed must be an integer in")
    refuse(capsys, [str(src), out, "--calib", str(calib), *BASE, "--nsamples", str(2**64)], "--nsamples must be")
    for extra in (["--no-mcs"], ["--method", "rtn"]):
        refuse(capsys, [str(src), out, "--calib", str(calib), *BASE, *extra, "--prefix-ratio", "0.5"],
               "--prefix-ratio applies to MCS only")
    refuse(capsys, [str(art), out, "--calib", str(calib), *BASE], "is a qdllm artifact (qdllm.json)")
    refuse(capsys, [str(src / "config.json"), out, "--calib", str(calib), *BASE], "config.json: not a directory")
    assert not (tmp_path / "o").exists()


def test_output_that_cannot_be_written(src, calib, tmp_path, capsys):
    """A file as OUT, or a path through one, raised NotADirectoryError with a traceback."""
    (tmp_path / "file").write_text("keep me")
    refuse(capsys, [str(src), str(tmp_path / "file"), "--calib", str(calib), *BASE], "file: is a file")
    refuse(capsys, [str(src), str(tmp_path / "file" / "o"), "--calib", str(calib), *BASE],
           "cannot be written (Not a directory)")
    assert (tmp_path / "file").read_text() == "keep me"


def refuse_after_progress(capsys, argv, message):
    """An error once the progress bar is up: the bar is closed first, so the error is a line of its own."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    last = capsys.readouterr().err.rstrip("\n").split("\n")[-1]
    assert e.value.code == 2 and last.startswith("qdllm-convert: error: ") and message in last, last


@pytest.mark.parametrize("method,value", [("rtn", float("nan")), ("gptq", float("inf")),
                                          ("quant-dllm", float("-inf"))])
def test_nan_or_inf_in_the_source_is_refused_and_leaves_nothing(src, calib, tmp_path, capsys, method, value):
    """rtn wrote an artifact whose errors were all nan and exited 0; the others failed after calibrating, on
    "H has non-finite entries", naming no tensor. A failure before the first layer is written left OUT holding
    only the resume state, so the same command, once fixed, was refused without --resume."""
    bad = shutil.copytree(src, tmp_path / "bad")
    tensors = load_file(str(bad / "model.safetensors"))
    tensors[Q + "weight"][3, 5] = value
    save_file(tensors, str(bad / "model.safetensors"))
    out = tmp_path / "out"
    argv = [str(bad), str(out), "--calib", str(calib), *BASE, "--method", method]
    message = f"qdllm-convert: error: {bad / 'model.safetensors'}: tensor '{Q}weight' holds NaN or inf"
    refuse_after_progress(capsys, argv, message)
    assert not out.exists()
    out.mkdir()  # an empty OUT that was already there stays, empty
    refuse_after_progress(capsys, argv, message)
    assert out.is_dir() and not any(out.iterdir())


def overflowing(tmp_path, layer, dtype=torch.float16, scales=(("ff_out", 3e4),)):
    """A copy of the tiny LLaDA with layer `layer`'s linears scaled, so that its activations overflow."""
    bad = write_checkpoint(tmp_path / "overflowing", "llada", dtype=dtype)
    tensors = load_file(str(bad / "model.safetensors"))
    top = torch.finfo(dtype).max * 0.9  # large, but finite in the checkpoint
    for linear, scale in scales:
        name = f"model.transformer.blocks.{layer}.{linear}.weight"
        tensors[name] = (tensors[name].float() * scale).clamp(-top, top).to(dtype)
    save_file(tensors, str(bad / "model.safetensors"))
    return bad


@pytest.mark.parametrize("method", ["rtn", "gptq", "quant-dllm"])
@pytest.mark.parametrize("layer", [0, 1])
def test_overflowing_activations_are_refused_naming_the_layer(tmp_path, calib, capsys, method, layer):
    """The layer's fp16 outputs overflow. rtn, which builds no H, wrote an artifact whose relative errors were all
    nan and exited 0; gptq and quant-dllm failed a layer later, on the next layer's H. A refusal keeps only the
    layers before it, so that --resume refuses the same way rather than continuing from a half-written layer."""
    bad = overflowing(tmp_path, layer)
    out = tmp_path / "out"
    argv = [str(bad), str(out), "--calib", str(calib), *BASE, "--method", method]
    message = (f"error: layer {layer}: its outputs hold NaN or inf in float16 on the calibration windows "
               "(overflowing activations); the model must compute finite activations in float16")
    refuse_after_progress(capsys, argv, message)
    if layer == 0:  # nothing written: OUT is removed, and the same command needs no --resume
        assert not out.exists()
        return
    kept = sorted(p.name for p in out.iterdir())
    assert kept == [artifact_module.PARTIAL, "model-00001-of-00003.safetensors"], kept
    assert len(json.loads((out / artifact_module.PARTIAL).read_text())["layers"]) == 1
    refuse_after_progress(capsys, [*argv, "--resume"], message)
    assert sorted(p.name for p in out.iterdir()) == kept


def test_non_finite_H_names_the_layer_and_linear(tmp_path, calib, capsys):
    """Inside the layer, in fp32, up_proj's outputs are so large that down_proj's H overflows, while down_proj
    scales them back to finite outputs: the error named no layer or linear."""
    bad = overflowing(tmp_path, 0, torch.float32, (("up_proj", 1e25), ("ff_out", 1e-25)))
    refuse_after_progress(capsys, [str(bad), str(tmp_path / "out"), "--calib", str(calib), *BASE, "--method", "gptq"],
                          "error: layer 0, 'model.transformer.blocks.0.ff_out.weight': H has non-finite entries: "
                          "its calibration inputs hold NaN or inf (overflowing activations)")


@pytest.mark.parametrize("case,message", [
    ("layers", "holds the weights of 2 layer(s), but {src}/config.json declares 3"),
    ("missing", "{src}: missing tensor 'model.transformer.blocks.1.ff_norm.weight' (expected shape [64])"),
    ("shape", ("{src}/model.safetensors: tensor 'model.transformer.blocks.1.ff_out.weight' has shape [64, 95], "
               "expected [64, 96]")),
])
def test_checkpoint_tensors_are_checked_before_calibration(src, calib, tmp_path, capsys, case, message):
    """A tensor missing or misshaped in a late layer (here the last) failed only when the conversion reached it,
    hours in on a large model, leaving a partial OUT that --resume could never finish."""
    bad = shutil.copytree(src, tmp_path / "bad")
    if case == "layers":
        cfg = json.loads((bad / "config.json").read_text())
        (bad / "config.json").write_text(json.dumps({**cfg, "n_layers": 3}))
    else:
        tensors = load_file(str(bad / "model.safetensors"))
        if case == "missing":
            del tensors["model.transformer.blocks.1.ff_norm.weight"]
        else:
            name = "model.transformer.blocks.1.ff_out.weight"
            tensors[name] = tensors[name][:, :95].contiguous()
        save_file(tensors, str(bad / "model.safetensors"))
    out = tmp_path / "out"
    refuse(capsys, [str(bad), str(out), "--calib", str(calib), *BASE], message.format(src=bad))  # no progress bar
    assert not out.exists()


def test_shards_get_the_mode_of_the_other_files(src, calib, tmp_path):
    """safetensors wrote the shards 0600, while config.json and qdllm.json were 0644: no other user could serve
    the artifact."""
    umask = os.umask(0o002)
    try:
        out = convert(src, tmp_path / "out", calib, "--method", "rtn")
    finally:
        os.umask(umask)
    modes = {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in out.iterdir()}
    assert modes == dict.fromkeys(modes, oct(0o664)) and sum(n.endswith(".safetensors") for n in modes) == 3, modes


@pytest.mark.parametrize("existing", [False, True])
def test_resume_without_an_interrupted_conversion_says_so(src, calib, tmp_path, capsys, existing):
    """--resume where OUT does not exist (or is empty) silently started a new conversion. It still starts one,
    since a run that failed before writing OUT is resumed by the same command, but says so first."""
    out = tmp_path / "out"
    if existing:
        out.mkdir()
    convert(src, out, calib, "--method", "rtn", "--resume")
    err = capsys.readouterr().err
    assert err.startswith(f"qdllm-convert: --resume: OUT ({out}) holds no interrupted conversion; starting a new "
                          "one\n"), err
    assert (out / MANIFEST).exists() and not (out / artifact_module.PARTIAL).exists()


@pytest.mark.parametrize("state", ["{", "[]", '{"header": 5, "layers": [], "shards": {}}',
                                   '{"header": {}, "shards": {}}', '{"header": {}, "layers": [], "shards": []}'])
def test_resume_with_a_corrupt_state_file(src, calib, tmp_path, capsys, state):
    """A corrupt state raised KeyError, AttributeError or TypeError, or a JSON error naming no file."""
    out = tmp_path / "out"
    out.mkdir()
    (out / artifact_module.PARTIAL).write_text(state)
    refuse(capsys, [str(src), str(out), "--calib", str(calib), *BASE, "--resume"],
           f"{artifact_module.PARTIAL}: unreadable (the state of an unfinished conversion)")
    assert (out / artifact_module.PARTIAL).read_text() == state


def test_tokenizer_beyond_the_vocabulary(tmp_path, calib, capsys):
    """Token ids past the embedding raised IndexError while embedding the calibration windows."""
    src = write_checkpoint(tmp_path / "small", "llada", embedding_size=120, vocab_size=120, mask_token_id=3,
                           eos_token_id=2)
    refuse(capsys, [str(src), str(tmp_path / "o"), "--calib", str(calib), *BASE],
           "the tokenizer has token id 127, but config.json's vocabulary holds 120 ids")


def test_unlisted_safetensors_in_an_artifact_are_not_loaded(broken, src):
    """Every *.safetensors in the folder was read, so a stray file (here the source's own weights, which sort
    after the shards) replaced tensors that the manifest's hashes vouch for."""
    tensors = load_file(str(src / "model.safetensors"))
    tensors["model.transformer.ln_f.weight"] = torch.full_like(tensors["model.transformer.ln_f.weight"], 7)
    save_file(tensors, str(broken / "model.safetensors"))
    norm = load_model(broken, dtype=torch.float32).norm.weight
    assert not torch.equal(norm, torch.full_like(norm, 7))


def test_missing_packed_tensor_names_the_artifact(broken):
    rewrite_shard(broken, lambda t: [t.pop(Q + p) for p in ("planes", "alpha_r", "alpha_c", "plane_ptr")])
    with pytest.raises(CheckpointError, match=f"^{broken}: missing tensor '{Q}planes'$"):
        load_model(broken)


def test_triton_backend_that_cannot_run_is_refused_at_load(art):
    """It loaded, then failed at the first forward (for a server: at every request)."""
    pytest.importorskip("triton")
    with pytest.raises(ValueError, match="backend 'triton' cannot run here: .*float32"):
        load_model(art, dtype=torch.float32, backend="triton")
