"""Native LLaDA and Dream against an independent float64 forward, plus the cache and subset paths."""
import pytest
import torch
import torch.nn.functional as F
from reference import reference_logits
from tiny import MASK, write_checkpoint

from qdllm.engine import KVPool, load_model
from qdllm.engine.kv_cache import PAGE
from qdllm.engine.model import RMSNorm, apply_rope, attention, fold_groups, rope_tables


def random_ids(B: int, L: int, seed: int = 0) -> torch.Tensor:
    ids = torch.randint(0, 120, (B, L), generator=torch.Generator().manual_seed(seed))
    ids[:, L // 2:: 3] = MASK
    return ids


def test_fp32_logits_match_float64_reference(model_dir):
    ids = random_ids(2, 37)
    logits = load_model(model_dir)(ids)
    assert logits.shape == (2, 37, 128) and logits.dtype == torch.float32
    ref = reference_logits(model_dir, ids)
    assert (logits.double() - ref).abs().max() < 1e-4 * ref.abs().max()


def test_float64_activations_are_normalised_and_rotated_in_float64():
    """Half precision is upcast to fp32 for the norm and LLaDA's rotation, as the references do; float64 is not
    rounded down to fp32 there, so a float64 model is a reference that runs reproducibly."""
    x = torch.randn(2, 5, 4, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    norm = RMSNorm(64, 1e-5).double()
    torch.testing.assert_close(norm(x), x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5), rtol=1e-14, atol=0)
    cos, sin = rope_tables(torch.arange(5)[None], 64, 10000.0)
    x1, x2 = x.chunk(2, dim=-1)
    rotated = x * cos.double() + torch.cat((-x2, x1), dim=-1) * sin.double()
    torch.testing.assert_close(apply_rope(x, cos, sin, fp32=True), rotated, rtol=1e-14, atol=0)
    half = x.to(torch.bfloat16)
    assert norm.to(torch.bfloat16)(half).dtype == apply_rope(half, cos, sin, fp32=True).dtype == torch.bfloat16


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-2), (torch.bfloat16, 6e-2)])
@pytest.mark.parametrize("family", ["llada", "dream"])
def test_half_precision_checkpoints(tmp_path, family, dtype, tol):
    path = write_checkpoint(tmp_path, family, dtype=dtype, tokenizer=False)
    model = load_model(path)
    assert model.embed.weight.dtype == dtype  # the checkpoint's torch_dtype is the default
    ids = random_ids(1, 20)
    ref = reference_logits(path, ids)
    assert (model(ids).double() - ref).abs().max() < tol * ref.abs().max()
    assert load_model(path, dtype=torch.float32)(ids).dtype == torch.float32


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_sharded_checkpoint_with_index_equals_single_file(tmp_path, family):
    one = write_checkpoint(tmp_path / "one", family, tokenizer=False)
    three = write_checkpoint(tmp_path / "three", family, shards=3, tokenizer=False)
    assert len(list(three.glob("*.safetensors"))) == 3 and (three / "model.safetensors.index.json").exists()
    ids = random_ids(1, 16)
    torch.testing.assert_close(load_model(one)(ids), load_model(three)(ids), rtol=0, atol=0)


def test_tied_embeddings_need_no_lm_head(tmp_path):
    path = write_checkpoint(tmp_path, "llada", weight_tying=True, tokenizer=False)
    ids = random_ids(1, 12)
    ref = reference_logits(path, ids)
    assert (load_model(path)(ids).double() - ref).abs().max() < 1e-4 * ref.abs().max()


def grouped_heads(device: str, dtype: torch.dtype, B=2, L=5, S=9, H=6, hkv=2, D=8):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, n, h, D, generator=g).to(device, dtype) for n, h in ((L, H), (S, hkv), (S, hkv)))
    mask = torch.ones(B, 1, 1, S, dtype=torch.bool)
    mask[0, ..., 6:] = False  # row 0 attends over its first 6 keys only
    return q, k, v, mask.to(device)


def test_folding_query_heads_into_rows_is_grouped_query_attention():
    """The CUDA path of Dream's attention (query heads sharing a K/V head read as extra query rows), run on the
    CPU in float64 against torch's enable_gqa and against K/V repeated per query head, as the authors' code does."""
    q, k, v, mask = grouped_heads("cpu", torch.float64)
    folded = fold_groups(q, k.transpose(1, 2), v.transpose(1, 2), mask)
    assert torch.allclose(folded, attention(q, k, v, mask), rtol=0, atol=1e-12)
    rep = [t.repeat_interleave(3, dim=2).transpose(1, 2) for t in (k, v)]
    expected = F.scaled_dot_product_attention(q.transpose(1, 2), *rep, attn_mask=mask).transpose(1, 2)
    assert torch.allclose(folded, expected.reshape(2, 5, 48), rtol=0, atol=1e-12)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_grouped_query_attention_with_a_key_mask_runs_in_the_memory_efficient_kernel_on_cuda():
    from torch.nn.attention import SDPBackend, sdpa_kernel
    q, k, v, mask = grouped_heads("cuda", torch.float16, L=32, S=96, H=28, hkv=4, D=128)
    expected = fold_groups(*(t.double().cpu() for t in (q, k.transpose(1, 2), v.transpose(1, 2))), mask.cpu())
    with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION):  # raises if the kernel cannot take the call
        out = attention(q, k, v, mask)
    assert (out.double().cpu() - expected).abs().max() < 2e-3


def test_logits_for_a_subset_of_positions(model_dir):
    model, ids = load_model(model_dir), random_ids(2, 24)
    full = model(ids)
    at = torch.tensor([[0, 5, 23], [3, 4, 10]])
    torch.testing.assert_close(model(ids, logits_at=at), full.gather(1, at[..., None].expand(-1, -1, 128)))


def test_key_padding_mask_isolates_padding(model_dir):
    """A right-padded row gives the logits it gives alone."""
    model, ids = load_model(model_dir), random_ids(2, 20)
    short = ids[1, :13]
    key_mask = torch.ones(2, 20, dtype=torch.bool)
    key_mask[1, 13:] = False
    batched = model(ids, key_mask=key_mask)
    torch.testing.assert_close(batched[1, :13], model(short[None])[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(batched[0], model(ids[:1])[0], rtol=1e-5, atol=1e-5)


def scattered() -> torch.Tensor:
    """Flat K/V positions of a 32-position sequence whose two pages lie out of order (pages 3, then 1)."""
    return torch.cat([torch.arange(3 * PAGE, 4 * PAGE), torch.arange(PAGE, 2 * PAGE)])


def cache(pool: KVPool, index: torch.Tensor, lo: int, hi: int, read: int | None = None):
    """The view for feeding positions [lo, hi) of the sequence at flat positions `index`; read=None attends
    over the fed tokens, otherwise over the sequence's first `read` positions."""
    return pool.view(index[lo:hi][None], None if read is None else index[:read][None])


@pytest.mark.parametrize("window", ["prefix", "dual"])
def test_cache_windows_reproduce_the_full_forward(model_dir, window):
    """After a refresh, feeding only the block (dual) or block + suffix (prefix) attends to the
    cached K/V, read back in sequence order from pages out of order, and gives the full forward's logits for
    an unchanged canvas."""
    model, ids, index = load_model(model_dir), random_ids(1, 32), scattered()
    full = model(ids)
    pool = KVPool(model.config, 4, "cpu", torch.float32)
    torch.testing.assert_close(model(ids, cache=cache(pool, index, 0, 32)), full)
    start, end = 16, 24
    lo = start - 1  # one token before the block: Dream reads the block's first logits from it
    hi = end if window == "dual" else 32
    out = model(ids[:, lo:hi], positions=torch.arange(lo, hi)[None], cache=cache(pool, index, lo, hi, read=32),
                logits_at=torch.arange(1, 1 + end - start)[None])
    torch.testing.assert_close(out, full[:, start:end], rtol=1e-5, atol=1e-5)


def test_cache_window_writes_new_block_kv_and_keeps_the_rest(llada_dir):
    """A window forward replaces its own positions and leaves the others as the refresh wrote them."""
    model, ids, index = load_model(llada_dir), random_ids(1, 32), scattered()
    pool = KVPool(model.config, 4, "cpu", torch.float32)
    model(ids, cache=cache(pool, index, 0, 32))
    k = lambda: pool.k[:, index]  # noqa: E731  (layers, positions, heads, dim)
    outside = torch.cat([k()[:, :16], k()[:, 24:]], 1).clone()
    changed = ids.clone()
    changed[0, 18] = 7
    model(changed[:, 16:24], positions=torch.arange(16, 24)[None], cache=cache(pool, index, 16, 24, read=32))
    torch.testing.assert_close(torch.cat([k()[:, :16], k()[:, 24:]], 1), outside, rtol=0, atol=0)
    fresh = KVPool(model.config, 2, "cpu", torch.float32)
    model(changed, cache=cache(fresh, torch.arange(32), 0, 32))  # layer 0's K depends on the tokens alone
    torch.testing.assert_close(k()[0, 16:24], fresh.k[0, 16:24])
    assert not torch.allclose(k()[0, 18], outside[0, 2])


def test_pages_are_handed_out_lowest_first_and_come_back(llada_dir):
    cfg = load_model(llada_dir).config
    pool = KVPool(cfg, 4, "cpu", torch.float32)  # fixed: 64 positions
    a, b = pool.allocate(20, rows=2)  # two pages each
    assert a.tolist() == list(range(20)) and b.tolist() == list(range(32, 52))
    assert pool.used_pages == 4 and not pool.can_allocate(1)
    with pytest.raises(ValueError, match="cannot hold 1 x 5 more positions"):
        pool.allocate(5)
    pool.release(a)
    assert pool.can_allocate(2) and not pool.can_allocate(3)
    assert pool.allocate(17)[0].tolist() == list(range(17))
    assert pool.k.shape[1] == 4 * PAGE + 1 and pool.scratch_position == 4 * PAGE  # never grown


def test_pool_growth_keeps_the_pages_in_use(llada_dir):
    model, ids = load_model(llada_dir), random_ids(1, 32)
    pool = KVPool(model.config, 0, "cpu", torch.float32, max_pages=12)
    (index,) = pool.allocate(32)
    model(ids, cache=cache(pool, index, 0, 32))
    before, old = pool.k[:, index].clone(), pool.k
    a, b = pool.allocate(40, rows=2)  # three pages each: the pool grows to 8
    assert pool.k is not old and pool.pages == 8 and pool.used_pages == 8
    assert a.tolist() == list(range(32, 72)) and b.tolist() == list(range(80, 120))
    torch.testing.assert_close(pool.k[:, index], before, rtol=0, atol=0)
    pool.allocate(16)  # grows by half at least, within max_pages
    assert pool.pages == 12 and not pool.can_allocate(4)


def test_a_pool_that_finds_no_memory_to_grow_tries_the_bare_need_then_keeps_its_size(llada_dir, device_room, caplog):
    model, ids = load_model(llada_dir), random_ids(1, 64)
    pool = KVPool(model.config, 0, "cpu", torch.float32, max_pages=12)
    (index,) = pool.allocate(64)  # four pages
    model(ids, cache=cache(pool, index, 0, 64))
    before = pool.k[:, index].clone()
    device_room(5)
    assert pool.allocate(16)[0].tolist() == list(range(64, 80))  # six pages did not fit; five did
    assert pool.pages == 5 and not pool.out_of_memory and pool.page_limit == 12
    assert not pool.reserve(1)  # seven, then six: neither fits
    assert pool.pages == 5 and pool.out_of_memory and pool.page_limit == 5
    assert "the device ran out of memory growing past 80 positions" in caplog.text
    torch.testing.assert_close(pool.k[:, index], before, rtol=0, atol=0)
    with pytest.raises(ValueError, match="cannot hold 1 x 1 more positions"):
        pool.allocate(1)
    pool.release(index)
    assert pool.allocate(64)[0].tolist() == list(range(64)) and pool.pages == 5


def test_scratch_writes_land_where_no_read_reaches(llada_dir):
    """Tokens that must not be stored go to the scratch position, past every page; cached K/V stay intact."""
    model, ids = load_model(llada_dir), random_ids(1, 32)
    pool = KVPool(model.config, 2, "cpu", torch.float32)
    model(ids, cache=cache(pool, torch.arange(32), 0, 32))
    kept = pool.k[:, :32].clone()
    model(random_ids(1, 32), cache=pool.view(torch.full((1, 32), pool.scratch_position)))
    torch.testing.assert_close(pool.k[:, :32], kept, rtol=0, atol=0)
    assert pool.scratch_position == pool.capacity == 32 and pool.k.shape[1] == 33
