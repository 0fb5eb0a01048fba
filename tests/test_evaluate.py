"""The masked-diffusion NLL bound estimator (`qdllm-eval`) against exact enumeration, and its CLI."""
import itertools
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from qdllm.engine import evaluate as evaluate_module
from qdllm.engine import load_model
from qdllm.engine.corpus import DataError, read_texts
from qdllm.engine.evaluate import difference, evaluate, main, mask_counts, random_masks, windows_nll
from qdllm.engine.model import DiffusionLM


def exact_bound(model, x: torch.Tensor) -> float:
    """E_l[(L/l) Σ_masked CE] with l uniform on 1..L and all l-subsets equally likely, by enumeration."""
    L, total = len(x), 0.0
    for l in range(1, L + 1):
        subsets = list(itertools.combinations(range(L), l))
        masks = torch.zeros(len(subsets), L, dtype=torch.bool)
        for row, s in enumerate(subsets):
            masks[row, list(s)] = True
        logits = model(torch.where(masks, model.config.mask_token_id, x))
        ce = F.cross_entropy(logits.transpose(1, 2), x.expand(len(subsets), L), reduction="none")
        total += (L / l) * (ce * masks).sum(1).mean().item() / L
    return total


def test_estimator_is_unbiased_against_exact_enumeration_on_three_tokens(llada_dir):
    model = load_model(llada_dir, dtype=torch.float64)
    x = torch.tensor([5, 7, 6, 5, 5, 7])  # a 3-token vocabulary
    exact = exact_bound(model, x)
    samples = windows_nll(model, x[None], mc=3000, gens=[torch.Generator().manual_seed(1)], batch_size=1000)
    assert samples.shape == (1, 3000)
    nll, se = samples.mean().item(), samples.std().item() / math.sqrt(3000)
    assert se < 0.01 * exact
    assert abs(nll - exact) < 4 * se, (nll, exact, se)


def test_mask_counts_are_stratified_and_masks_have_those_counts():
    gen = torch.Generator().manual_seed(0)
    counts = mask_counts(L=8, mc=8, gen=gen)
    assert sorted(counts.tolist()) == list(range(1, 9))
    counts = mask_counts(L=8, mc=32, gen=gen)
    assert torch.bincount(counts, minlength=9)[1:].tolist() == [4] * 8
    masks = random_masks(counts, 8, gen)
    assert masks.sum(1).tolist() == counts.tolist()


def test_every_token_is_scored_once_and_the_seed_fixes_the_result(llada_dir):
    model = load_model(llada_dir)
    ids = torch.randint(0, 120, (50,), generator=torch.Generator().manual_seed(3)).tolist()
    a = evaluate(model, ids, seqlen=16, mc=4, seed=0, progress=False)
    b = evaluate(model, ids, seqlen=16, mc=4, seed=0, progress=False, batch_size=3)
    c = evaluate(model, ids, seqlen=16, mc=4, seed=1, progress=False)
    assert a.windows == 4 and a.tokens.tolist() == [16, 16, 16, 2]
    assert a.nll_per_token == pytest.approx(b.nll_per_token, rel=1e-6)  # masks do not depend on the batching
    assert a.nll_per_token != c.nll_per_token
    assert a.stderr > 0


def test_paired_difference_cancels_the_shared_mask_noise(llada_dir):
    """Two nearby models on the same masks: the paired standard error is far below either model's own."""
    model = load_model(llada_dir, dtype=torch.float64)
    ids = torch.randint(0, 120, (64,), generator=torch.Generator().manual_seed(4)).tolist()
    a = evaluate(model, ids, seqlen=16, mc=8, seed=0, progress=False)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.01)
    b = evaluate(model, ids, seqlen=16, mc=8, seed=0, progress=False)
    d, se = difference(b, a)
    assert d == pytest.approx(b.nll_per_token - a.nll_per_token)
    assert 0 < se < 0.2 * min(a.stderr, b.stderr)
    assert difference(a, a) == (0.0, 0.0)
    with pytest.raises(ValueError, match="different windows"):
        difference(a, evaluate(model, ids, seqlen=8, mc=8, seed=0, progress=False))


def write_text(path, n: int = 40, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    path.write_text(" ".join(f"w{i}" for i in torch.randint(5, 8, (n,), generator=gen).tolist()))


def test_cli_writes_json_and_is_deterministic(llada_dir, tmp_path, capsys):
    data = tmp_path / "text.txt"
    write_text(data)
    runs = []
    for name in ("a", "b"):
        main([str(llada_dir), "--data", str(data), "--mc", "8", "--seqlen", "16", "--json", str(tmp_path / name)])
        runs.append(json.loads((tmp_path / name).read_text()))
        assert json.loads(capsys.readouterr().out) == runs[-1]
    a, b = runs
    assert a["nll_per_token"] == b["nll_per_token"] and a["nll_stderr"] == b["nll_stderr"]
    assert a["tokens"] == 40 and a["windows"] == 3 and a["mc"] == 8 and a["seed"] == 0 and a["seqlen"] == 16
    assert a["ppl_bound"] == pytest.approx(math.exp(a["nll_per_token"]))


def test_jsonl_documents_are_joined_with_eos(llada_dir, tmp_path):
    data = tmp_path / "docs.jsonl"
    data.write_text('{"text": "w5 w6"}\n\n{"text": "w7"}\n')
    main([str(llada_dir), "--data", str(data), "--mc", "2", "--json", str(tmp_path / "out.json")])
    assert json.loads((tmp_path / "out.json").read_text())["tokens"] == 4  # w5 w6 EOS w7


@pytest.mark.parametrize("content,message", [
    (None, "not found"),
    ("", "holds no text"),
    ('{"text": "w5"}\n{"txt": "w6"}\n', "docs.jsonl:2: expected an object with a string field 'text'"),
    ('{"text": "w5"}\nnot json\n', "docs.jsonl:2: not valid JSON"),
    ('{"text": "w5 \\ud800"}\n', "docs.jsonl:1: 'text' holds a lone UTF-16 surrogate escape"),  # was a traceback
])
def test_bad_data_files_are_refused_in_one_line(tmp_path, content, message):
    path = tmp_path / "docs.jsonl"
    if content is not None:
        path.write_text(content)
    with pytest.raises(DataError, match=message):
        read_texts(path)


@pytest.mark.parametrize("args,message", [
    (["--mc", "0"], "--mc must be an integer at least 1, got '0'"),
    (["--seqlen", "9999"], "--seqlen must be at most the model's max_sequence_length (256), got 9999"),
    (["--device", "tpu"], "--device must be cpu, cuda or cuda:N, got 'tpu'"),
    (["--data", "missing.txt"], "missing.txt: not found"),
])
def test_cli_refuses_bad_input_in_one_line(llada_dir, tmp_path, capsys, args, message):
    data = tmp_path / "text.txt"
    write_text(data)
    with pytest.raises(SystemExit) as e:
        main([str(llada_dir), "--data", str(data), *args])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and err.startswith("qdllm-eval: error: ") and "\n" not in err


def test_installed_command_refuses_a_missing_model(tmp_path):
    data = tmp_path / "text.txt"
    data.write_text("w5")
    command = Path(sys.executable).parent / "qdllm-eval"
    r = subprocess.run([str(command), str(tmp_path / "nope"), "--data", str(data)], capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip() == f"qdllm-eval: error: {tmp_path / 'nope'}: not found (expected a Hugging Face " \
                               "checkpoint directory)"


def scaled_head(llada_dir, tmp_path, factor: float) -> Path:
    """A copy of the tiny checkpoint with its LM head scaled by `factor`."""
    path = tmp_path / "model"
    shutil.copytree(llada_dir, path)
    tensors = load_file(path / "model.safetensors")
    tensors["model.transformer.ff_out.weight"] *= factor
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    return path


def test_a_bound_beyond_float64_perplexity_is_printed_with_a_null_perplexity(llada_dir, tmp_path, capsys):
    """exp(nll) overflows above about 709 nats: the result is still printed and written, as valid JSON."""
    data, out = tmp_path / "text.txt", tmp_path / "out.json"
    write_text(data)
    main([str(scaled_head(llada_dir, tmp_path, 1e4)), "--data", str(data), "--mc", "2", "--json", str(out)])
    printed, err = capsys.readouterr()
    result = json.loads(printed, parse_constant=pytest.fail)  # NaN or Infinity would be invalid JSON
    assert result == json.loads(out.read_text())
    assert 709.8 < result["nll_per_token"] < math.inf and result["nll_stderr"] > 0
    assert result["ppl_bound"] is None and result["ppl_stderr"] is None
    assert "perplexity bound inf over 40 tokens" in err


def test_a_model_with_nan_weights_is_refused_in_one_line(llada_dir, tmp_path, capsys):
    data = tmp_path / "text.txt"
    write_text(data)
    with pytest.raises(SystemExit) as e:
        main([str(scaled_head(llada_dir, tmp_path, math.nan)), "--data", str(data), "--mc", "2"])
    assert e.value.code == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.splitlines()[-1] == (f"qdllm-eval: error: the model's logits are NaN or inf on {data}; check the "
                                    "checkpoint's weights")


@pytest.mark.parametrize("error", [
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"),
    RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you "
                 "tried to allocate 17179869184 bytes. Error code 12 (Cannot allocate memory)"),
])
def test_running_out_of_memory_names_the_batch_size(llada_dir, tmp_path, capsys, monkeypatch, error):
    data = tmp_path / "text.txt"
    write_text(data)

    def fail(*args, **kwargs):
        raise error
    monkeypatch.setattr(DiffusionLM, "forward", fail)
    with pytest.raises(SystemExit) as e:
        main([str(llada_dir), "--data", str(data), "--mc", "2", "--batch-size", "64"])
    assert e.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == \
        "qdllm-eval: error: out of memory with --batch-size 64; lower --batch-size"


def test_other_runtime_errors_are_not_reported_as_out_of_memory(llada_dir, tmp_path, monkeypatch):
    data = tmp_path / "text.txt"
    write_text(data)

    def fail(*args, **kwargs):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")
    monkeypatch.setattr(DiffusionLM, "forward", fail)
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        main([str(llada_dir), "--data", str(data), "--mc", "2"])


def test_a_batch_whose_logits_cannot_fit_is_refused_before_any_forward(llada_dir, tmp_path, capsys, monkeypatch):
    """--mc 65536 with a huge --batch-size asks for one forward of every sample: on the CPU that was an OOM kill."""
    data = tmp_path / "text.txt"
    write_text(data)
    forwards = []
    monkeypatch.setattr(DiffusionLM, "forward", lambda *args: forwards.append(args))
    monkeypatch.setattr(evaluate_module, "device_memory", lambda device: 10**9)
    with pytest.raises(SystemExit) as e:  # 2 full windows x 65536 samples x 16 tokens x 128 logits x 16 bytes
        main([str(llada_dir), "--data", str(data), "--mc", "65536", "--seqlen", "16", "--batch-size", "10000000000"])
    assert e.value.code == 2 and forwards == []
    assert capsys.readouterr().err.splitlines()[-1] == (
        "qdllm-eval: error: out of memory with --batch-size 10000000000 (the float64 cross entropy of one forward "
        "of 131072 samples needs 4.3 GB, and the cpu has 1.0 GB); lower --batch-size")
