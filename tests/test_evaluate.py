"""The masked-diffusion NLL bound estimator (`qdllm-eval`) against exact enumeration, and its CLI."""
import itertools
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from qdllm.engine import load_model
from qdllm.engine.corpus import DataError, read_texts
from qdllm.engine.evaluate import difference, evaluate, main, mask_counts, random_masks, windows_nll


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
    (["--device", "tpu"], "device must be cpu, cuda or cuda:N, got 'tpu'"),
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
    assert r.stderr.strip() == f"qdllm-eval: error: {tmp_path / 'nope'}: not a directory (expected a Hugging Face " \
                               "checkpoint directory)"
