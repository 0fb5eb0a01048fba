"""Forwards replayed from CUDA graphs (engine/cuda_graphs.py).

Without a GPU, a stand-in capture replays by re-running the recorded forward on the same fixed input
tensors into the same output tensor, which is what a CUDA graph replay does; so the CPU tests check the
bookkeeping: inputs copied in before each replay, one capture per shape, padded batches, a pool that grows,
eviction. The real capture runs in the CUDA test at the end.
"""
import pytest
import torch
from qdllm.engine import LLM, Detokenizer, EngineCore, SamplingParams, load_model
from qdllm.engine.cuda_graphs import CudaGraphCapture, ForwardGraphs, run_forward
from test_engine import REQUESTS, alone, drain, drain_one


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


def graph_core(model, max_num_seqs=8, max_graphs=32, max_tokens=2048):
    core = EngineCore(model, Detokenizer(None, frozenset()), max_num_seqs=max_num_seqs)
    core.graphs = ForwardGraphs(model, max_num_seqs, capture=Replaying(), max_graphs=max_graphs,
                                max_tokens=max_tokens)
    return core


def tokens(outputs, ids):
    return [outputs[i][-1].token_ids for i in ids]


@pytest.mark.parametrize("max_graphs, max_tokens", [(32, 2048), (2, 2048), (32, 128)])
def test_replayed_forwards_give_the_tokens_of_eager_forwards(model_dir, max_graphs, max_tokens):
    """Mixed caches, CFG and arrivals between steps: full and window forwards of 1 to 6 rows, padded to 1,
    2, 4 or 8 rows and full ones to a multiple of 64 tokens; with max_tokens=128 the larger ones stay eager."""
    model = load_model(model_dir)
    stagger = {2 * i: r for i, r in enumerate(REQUESTS)}
    eager = drain(EngineCore(model, Detokenizer(None, frozenset()), max_num_seqs=8), stagger)
    core = graph_core(model, max_graphs=max_graphs, max_tokens=max_tokens)
    replayed = drain(core, stagger)
    ids = sorted(eager)
    assert tokens(replayed, ids) == tokens(eager, ids)
    graphs, capture = core.graphs, core.graphs.capture
    assert 0 < graphs.captures < capture.replays  # shapes repeat: captured once, replayed
    assert (capture.replays < core.stats.forwards) == (max_tokens == 128)  # the larger forwards stay eager
    assert len(graphs.graphs) <= max_graphs
    for full, _, rows, length, read, _ in graphs.graphs:
        assert rows in (1, 2, 4, 8) and rows * length <= max_tokens and (not full or length % 64 == 0)
        assert read % 64 == 0
    if max_graphs > 2:  # both kinds of forward were captured (with eviction only the latest shapes are left)
        assert {key[0] for key in graphs.graphs} == {True, False}


def test_a_growing_pool_drops_the_graphs_that_hold_the_old_one(llada_dir):
    model = load_model(llada_dir)
    short = ([5, 6, 7], SamplingParams(max_tokens=16, steps=8, block_length=8, cache="dual", ignore_eos=True))
    long = (list(range(3, 103)), SamplingParams(max_tokens=64, steps=16, block_length=16, cache="prefix",
                                                ignore_eos=True))
    core = graph_core(model)
    core.add_request(*short, request_id="short")
    drain(core)
    old = core.pool.k
    assert core.graphs.graphs and core.pool.pages == 2  # 19 positions
    core.add_request(*long, request_id="long")
    out = drain(core)["long"][-1]
    assert core.pool.k is not old and core.pool.pages == 11  # 164 positions: grown when the long one came
    assert {key[4] for key in core.graphs.graphs} == {192}  # only the long request's: 164 positions read, padded
    assert out.token_ids == alone(model, *long).token_ids


def test_graphs_share_one_logits_buffer(llada_dir):
    """Four rows' logits first, then one row's, of other shapes: every live graph writes its logits into the one
    buffer, which the first capture sized, and the tokens are those of eager forwards."""
    model = load_model(llada_dir)
    sp = SamplingParams(max_tokens=16, steps=8, block_length=8, cache="dual", ignore_eos=True)
    batch = [([5 + i, 6, 7], sp) for i in range(4)]
    single = (list(range(3, 40)), SamplingParams(max_tokens=16, steps=8, block_length=8, cache="prefix",
                                                  ignore_eos=True))
    core = graph_core(model)
    ids = [core.add_request(*r) for r in batch]
    replayed = drain(core)
    buffer = core.graphs.logits
    assert buffer.numel() == 4 * 8 * model.config.vocab_size
    lone = drain_one(core, *single)
    outs = [out for _, _, out in core.graphs.graphs.values()]
    assert core.graphs.logits is buffer and len({out.shape for out in outs}) >= 2
    assert {out.untyped_storage().data_ptr() for out in outs} == {buffer.data_ptr()}
    assert lone.token_ids == alone(model, *single).token_ids
    assert [replayed[i][-1].token_ids for i in ids] == [alone(model, *r).token_ids for r in batch]


def test_sequences_of_different_lengths_share_their_graphs(llada_dir):
    """Prompts of 19, 11 and 3 tokens, one after another (longest first, so the pool never grows): their full
    forwards pad to 64 tokens and their window forwards read 64 positions, so two captures serve all three, and
    the tokens are the eager ones."""
    model = load_model(llada_dir)
    params = SamplingParams(max_tokens=16, steps=8, block_length=8, cache="dual", ignore_eos=True)
    core = graph_core(model)
    for n in (19, 11, 3):
        prompt = list(range(5, 5 + n))
        core.add_request(prompt, params, request_id="r")
        assert drain(core)["r"][-1].token_ids == alone(model, prompt, params).token_ids
    assert core.graphs.captures == 2 and core.graphs.capture.replays == 3 * 8


def test_graph_shapes_pad_rows_and_full_lengths_up_to_the_token_cap(llada_dir):
    graphs = ForwardGraphs(load_model(llada_dir), max_num_seqs=12, capture=Replaying(), max_tokens=1024)
    assert [graphs.shape(b, 32, 100, False)[0] for b in (1, 2, 3, 5, 8, 9, 12)] == [1, 2, 4, 8, 8, 12, 12]
    assert graphs.shape(3, 33, 100, False) == (4, 33, 128)  # windows keep their length; their reads are padded
    assert graphs.shape(3, 33, 33, True) == (4, 64, 64)  # a full forward reads what it is fed
    assert graphs.shape(3, 193, 193, True) == (4, 256, 256)  # 1024 tokens: at the cap
    assert graphs.shape(3, 257, 257, True) is None  # 4 x 320 tokens: eager
    assert graphs.shape(9, 85, 300, False) == (12, 85, 320)
    assert graphs.shape(9, 86, 300, False) is None


def test_cuda_graphs_need_a_cuda_device(llada_dir):
    """By default they are on for a CUDA device only; asked for elsewhere, they are refused."""
    model = load_model(llada_dir, device="cpu")
    assert EngineCore(model, Detokenizer(None, frozenset())).graphs is None
    if torch.cuda.is_available():
        assert EngineCore(load_model(llada_dir, device="cuda"), Detokenizer(None, frozenset())).graphs is not None
    with pytest.raises(ValueError, match=r"^cuda_graphs needs a CUDA device; the model is on cpu$"):
        EngineCore(model, Detokenizer(None, frozenset()), cuda_graphs=True)
    with pytest.raises(ValueError, match=r"^cuda_graphs needs a CUDA device, got cpu$"):
        LLM(llada_dir, device="cpu", cuda_graphs=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_replays_match_eager_logits(model_dir):
    """The real capture: every replayed forward of mixed requests (full and window, padded), against the same
    forward run eagerly on the same inputs just before (its K/V writes store the same values)."""
    model = load_model(model_dir, device="cuda", dtype=torch.float16)
    core = EngineCore(model, Detokenizer(None, frozenset()), max_num_seqs=8, cuda_graphs=True)
    graphs = core.graphs
    replay_forward, checked = graphs.forward, []

    def checked_forward(pool, full, *inputs):
        eager = run_forward(model, pool, full, *[t.to("cuda") for t in inputs])
        replayed = replay_forward(pool, full, *inputs)
        real = inputs[2].sum(1) > 1  # padding rows attend to one key, the scratch, whose K/V their writes race for
        torch.testing.assert_close(replayed[real].float(), eager[real].float(), rtol=2e-2, atol=2e-2)
        checked.append(full)
        return replayed

    graphs.forward = checked_forward
    drain(core, {2 * i: r for i, r in enumerate(REQUESTS)})
    assert len(checked) > graphs.captures > 0 and set(checked) == {True, False}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_captures_hold_no_memory_but_their_outputs():
    """Each capture used to warm up on a new stream, and cuBLAS keeps a workspace (4 to 32 MiB) per stream for
    good: after the first capture, more captures of GEMMs may only add their outputs to allocated memory."""
    capture = CudaGraphCapture(torch.device("cuda", 0))
    a = torch.randn(256, 256, device="cuda", dtype=torch.float16)
    capture(lambda: a @ a)  # the side stream's cuBLAS workspace, once per process
    before = torch.cuda.memory_allocated()
    outs = [capture(lambda n=n: a[:n] @ a)[1] for n in (64, 128, 192)]
    grown = torch.cuda.memory_allocated() - before
    assert grown <= sum(o.numel() * o.element_size() for o in outs) + (1 << 20)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
@pytest.mark.parametrize("cuda_graphs", [False, True])
def test_a_model_on_the_second_gpu_gives_the_first_gpus_tokens(shipped_artifact, cuda_graphs):
    """Triton launches on the current device, which stays cuda:0 here: the kernels, the captures and the replays
    must all run on cuda:1 for the 2-bit model there."""
    prompts = [[5, 6, 7, 8], [9, 10, 11, 12, 13, 14]]
    sp = SamplingParams(max_tokens=32, steps=16, block_length=16, cache="dual", ignore_eos=True)
    runs = [LLM(shipped_artifact, device=device, cuda_graphs=cuda_graphs).generate(prompts, sp)
            for device in ("cuda:0", "cuda:1")]
    assert torch.cuda.current_device() == 0
    assert [o.token_ids for o in runs[1]] == [o.token_ids for o in runs[0]]
