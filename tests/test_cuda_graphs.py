"""Window forwards replayed from CUDA graphs (engine/cuda_graphs.py).

Without a GPU, a stand-in capture replays by re-running the recorded forward on the same fixed input
tensors into the same output tensor, which is what a CUDA graph replay does; so the CPU tests check the
bookkeeping: inputs copied in before each replay, one capture per shape, padded batches, a pool that grows,
eviction. The real capture runs in the CUDA test at the end.
"""
import pytest
import torch
from test_engine import REQUESTS, alone, drain

from qdllm.engine import LLM, Detokenizer, EngineCore, SamplingParams, load_model
from qdllm.engine.cuda_graphs import WindowGraphs


class Replaying:
    """capture(fn) -> (replay, output) like CudaGraphCapture, counting captures and replays."""

    def __init__(self):
        self.replays = 0

    def __call__(self, fn):
        out = fn()

        def replay():
            self.replays += 1
            out.copy_(fn())
        return replay, out


def graph_core(model, max_num_seqs=8, max_graphs=32):
    core = EngineCore(model, Detokenizer(None, frozenset()), max_num_seqs=max_num_seqs)
    core.graphs = WindowGraphs(model, max_num_seqs, capture=Replaying(), max_graphs=max_graphs)
    return core


def tokens(outputs, ids):
    return [outputs[i][-1].token_ids for i in ids]


@pytest.mark.parametrize("max_graphs", [32, 2])
def test_replayed_windows_give_the_tokens_of_eager_forwards(model_dir, max_graphs):
    """Mixed caches, CFG and arrivals between steps: batches of 1 to 6 rows padded to 1, 2, 4 or 8."""
    model = load_model(model_dir)
    stagger = {2 * i: r for i, r in enumerate(REQUESTS)}
    eager = drain(EngineCore(model, Detokenizer(None, frozenset()), max_num_seqs=8), stagger)
    core = graph_core(model, max_graphs=max_graphs)
    replayed = drain(core, stagger)
    ids = sorted(eager)
    assert tokens(replayed, ids) == tokens(eager, ids)
    graphs, capture = core.graphs, core.graphs.capture
    assert 0 < graphs.captures < capture.replays  # shapes repeat within a block: captured once, replayed
    assert len(graphs.graphs) <= max_graphs
    assert all(key[0] in (1, 2, 4, 8) for key in graphs.graphs)


def test_a_growing_pool_drops_the_graphs_that_hold_the_old_one(llada_dir):
    model = load_model(llada_dir)
    short = ([5, 6, 7], SamplingParams(max_tokens=16, steps=8, block_length=8, cache="dual", ignore_eos=True))
    long = (list(range(3, 103)), SamplingParams(max_tokens=64, steps=16, block_length=16, cache="prefix",
                                                ignore_eos=True))
    core = graph_core(model)
    core.add_request(*short, request_id="short")
    drain(core)
    old = core.pool.k
    assert core.graphs.graphs and core.pool.length == 128
    core.add_request(*long, request_id="long")
    out = drain(core)["long"][-1]
    assert core.pool.k is not old and core.pool.length == 256
    assert all(key[2] == 164 for key in core.graphs.graphs)  # only the long request's read length is left
    assert out.token_ids == alone(model, *long).token_ids


def test_rows_are_padded_to_powers_of_two_up_to_the_slots(llada_dir):
    graphs = WindowGraphs(load_model(llada_dir), max_num_seqs=12, capture=Replaying())
    assert [graphs.rows(b) for b in (1, 2, 3, 5, 8, 9, 12)] == [1, 2, 4, 8, 8, 12, 12]


def test_cuda_graphs_need_a_cuda_device(llada_dir):
    model = load_model(llada_dir, device="cpu")
    with pytest.raises(ValueError, match=r"^cuda_graphs needs a CUDA device; the model is on cpu$"):
        EngineCore(model, Detokenizer(None, frozenset()), cuda_graphs=True)
    with pytest.raises(ValueError, match=r"^cuda_graphs needs a CUDA device, got cpu$"):
        LLM(llada_dir, device="cpu", cuda_graphs=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_replays_match_eager_logits(model_dir):
    """The real capture: every window forward of mixed requests, replayed, against the same forward run eagerly
    on the same inputs (before the replay's K/V writes, which store the same values)."""
    model = load_model(model_dir, device="cuda", dtype=torch.float16)
    core = EngineCore(model, Detokenizer(None, frozenset()), max_num_seqs=8, cuda_graphs=True)
    graphs = core.graphs
    replay_forward, checked = graphs.forward, []

    def checked_forward(pool, ids, positions, key_mask, write_slot, write_pos, read_slot, logits_at):
        dev = ids.device
        view = pool.view(write_slot.to(dev), write_pos.to(dev), read_slot.to(dev), key_mask.shape[1])
        eager = model(ids, positions=positions.to(dev), key_mask=key_mask.to(dev), cache=view,
                      logits_at=logits_at.to(dev))
        replayed = replay_forward(pool, ids, positions, key_mask, write_slot, write_pos, read_slot, logits_at)
        torch.testing.assert_close(replayed.float(), eager.float(), rtol=2e-2, atol=2e-2)
        checked.append(ids.shape)
        return replayed

    graphs.forward = checked_forward
    drain(core, {2 * i: r for i, r in enumerate(REQUESTS)})
    assert len(checked) > graphs.captures > 0
