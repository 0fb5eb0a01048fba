"""Quant-dLLM's algorithms on small random data: MCS, H and U, ABMP, DAQ and its refinement, the block
compensation and the uniform baselines."""
import math

import pytest
import torch

from qdllm.quantizer.abmp import abmp_orders
from qdllm.quantizer.daq import daq_block, reconstruct, salience_weights, update_signs, weighted_error
from qdllm.quantizer.hessian import HessianAccumulator, inverse_cholesky
from qdllm.quantizer.mcs import mcs_batch
from qdllm.quantizer.quant_dllm import quant_dllm
from qdllm.quantizer.refine import assign_signs, block_error, refine_block, refit_scales
from qdllm.quantizer.uniform import gptq, rtn

MASK_ID = 999


def correlated_inputs(n: int, k: int, rank: int, seed: int) -> torch.Tensor:
    """Low-rank-plus-noise activations: strongly correlated columns, as in LLM layer inputs."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, rank, generator=g) @ torch.randn(rank, k, generator=g) + 0.1 * torch.randn(n, k, generator=g)


def output_error(X: torch.Tensor, W: torch.Tensor, Q: torch.Tensor) -> float:
    return ((X @ (W - Q).T).norm() / (X @ W.T).norm()).item()


# --- MCS ---

def test_mcs_keeps_the_prefix_and_masks_the_rest_at_rate_t():
    n, length = 8, 1000
    windows = torch.randint(0, 100, (n, length), generator=torch.Generator().manual_seed(0))
    out = mcs_batch(windows, MASK_ID, prefix_ratio=0.25, seed=3)
    assert torch.equal(out[:, :250], windows[:, :250])
    kept = out[:, 250:] != MASK_ID
    assert torch.equal(out[:, 250:][kept], windows[:, 250:][kept])  # a token is either kept or masked
    for i in range(n):
        t = (i + 1) / n
        frac = (~kept[i]).float().mean().item()
        assert abs(frac - t) <= 4 * math.sqrt(t * (1 - t) / 750) + 1e-9, (i, frac, t)
    assert bool((~kept[-1]).all())  # t = 1


def test_mcs_is_deterministic_and_independent_of_batching():
    windows = torch.randint(0, 100, (6, 64), generator=torch.Generator().manual_seed(1))
    whole = mcs_batch(windows, MASK_ID, seed=5)
    assert torch.equal(whole, mcs_batch(windows, MASK_ID, seed=5))
    assert not torch.equal(whole, mcs_batch(windows, MASK_ID, seed=6))
    parts = [mcs_batch(windows[a:b], MASK_ID, seed=5, first=a, total=6) for a, b in [(0, 2), (2, 5), (5, 6)]]
    assert torch.equal(torch.cat(parts), whole)
    assert mcs_batch(windows, MASK_ID, enabled=False) is windows


# --- H and U ---

def test_hessian_running_average_and_inverse_cholesky():
    X = correlated_inputs(300, 16, 4, seed=0)
    acc = HessianAccumulator(16)
    acc.add(X[:100].reshape(10, 10, 16))
    acc.add(X[100:])
    assert acc.n == 300
    torch.testing.assert_close(acc.H, 2 / 300 * X.T @ X, rtol=1e-5, atol=1e-5)
    U, dead = inverse_cholesky(acc.H)
    assert not dead.any() and torch.equal(U, U.triu())
    damped = acc.H.double() + 0.01 * acc.H.diagonal().mean().double() * torch.eye(16, dtype=torch.float64)
    torch.testing.assert_close(U.double().T @ U.double(), torch.linalg.inv(damped), rtol=1e-3, atol=1e-4)


def test_inverse_cholesky_dead_columns_and_failure():
    X = torch.randn(50, 8, generator=torch.Generator().manual_seed(2))
    X[:, 3] = 0
    H = 2 / 50 * X.T @ X
    U, dead = inverse_cholesky(H)
    assert dead.tolist() == [i == 3 for i in range(8)] and bool(torch.isfinite(U).all())
    assert H[3, 3] == 0  # the caller's H is left alone
    with pytest.warns(UserWarning, match="not positive definite"), pytest.raises(ValueError, match="positive definite"):
        inverse_cholesky(-torch.eye(4))


# --- ABMP ---

def test_abmp_gives_one_block_each_of_orders_1_and_3_at_32_blocks():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(8, 32 * 16, generator=g)
    W[:, 5 * 16:6 * 16] *= 0.01    # block 5: the least salient
    W[:, 20 * 16:21 * 16] *= 10.0  # block 20: the most salient
    d = torch.rand(32 * 16, generator=g) + 0.5
    orders = abmp_orders(W, d, block_size=16, ratio=0.05)
    assert orders.tolist() == [1 if b == 5 else 3 if b == 20 else 2 for b in range(32)]
    assert torch.equal(abmp_orders(W, d, block_size=16, ratio=0.0), torch.full((32,), 2))


def test_abmp_averages_exactly_two_and_breaks_ties_by_index():
    W = torch.ones(4, 7 * 16)  # every block equally salient
    orders = abmp_orders(W, torch.ones(7 * 16), block_size=16, ratio=0.5)
    assert orders.tolist() == [1, 1, 1, 2, 3, 3, 3]
    orders = abmp_orders(torch.randn(4, 20 * 16), torch.ones(20 * 16), block_size=16, ratio=0.1)
    assert sorted(orders.tolist()) == [1, 1] + [2] * 16 + [3, 3]


# --- DAQ ---

def salient_block(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(48, 128, generator=g) * (torch.rand(48, 1, generator=g) + 0.5)
    return W, torch.rand(128, generator=g) + 0.2


@pytest.mark.parametrize("order", [1, 2, 3])
def test_daq_weighted_objective_never_increases(order):
    W, d = salient_block(order)
    history: list[float] = []
    daq_block(W, d, order, history=history)
    assert len(history) == 16
    for before, after in zip(history, history[1:]):
        assert after <= before * (1 + 1e-6), history
    assert history[-1] < 0.99 * history[0]  # the refinement does something


def test_daq_beats_sign_and_mean_binarisation():
    W, d = salient_block(7)
    M = salience_weights(W, d)
    assert 0.01 < (M == 3).float().mean() < 0.2
    _, Q = daq_block(W, d, 2)
    _, Q_naive = daq_block(W, d, 2, naive=True)
    a = W.abs().mean(1, keepdim=True)  # sign-and-mean, first plane: row mean, then column mean of |W|/a
    plain = a * (W.abs() / a).mean(0) * torch.where(W >= 0, 1.0, -1.0)
    torch.testing.assert_close(daq_block(W, d, 1, naive=True)[1], plain, rtol=1e-3, atol=1e-4)
    assert weighted_error(W, Q, M) < 0.85 * weighted_error(W, Q_naive, M)


def test_daq_codes_reconstruct_q_with_fp16_scales():
    W, d = salient_block(3)
    for order in (1, 2, 3):
        code, Q = daq_block(W, d, order)
        assert code.order == order and code.signs.shape == (order, 48, 128) and code.signs.dtype == torch.bool
        assert torch.equal(code.alpha_r.half().float(), code.alpha_r)
        assert torch.equal(code.alpha_c.half().float(), code.alpha_c)
        torch.testing.assert_close(reconstruct(code.alpha_r, code.alpha_c, code.signs.float() * 2 - 1), Q)
    code, _ = daq_block(W, d, 1)
    assert torch.equal(code.signs[0], W >= 0)


def test_joint_sign_update_is_the_brute_force_optimum():
    g = torch.Generator().manual_seed(4)
    W = torch.randn(2, 2, generator=g)
    alpha_r, alpha_c = torch.randn(3, 2, generator=g), torch.rand(3, 2, generator=g) + 0.1
    M = torch.rand(2, 2, generator=g) + 0.5
    configs = ((torch.arange(2 ** 12)[:, None] >> torch.arange(12)) & 1).float() * 2 - 1
    B_all = configs.reshape(-1, 3, 2, 2)
    recon = (alpha_r[None, :, :, None] * alpha_c[None, :, None, :] * B_all).sum(1)
    best = (M * (W - recon).square()).sum((1, 2)).min()
    got = weighted_error(W, reconstruct(alpha_r, alpha_c, update_signs(W, alpha_r, alpha_c)), M)
    torch.testing.assert_close(got.float(), best, rtol=1e-6, atol=1e-7)


# --- block compensation ---

def per_block(W: torch.Tensor, d: torch.Tensor, orders: torch.Tensor, G: int = 128) -> torch.Tensor:
    return torch.cat([daq_block(W[:, b * G:(b + 1) * G], d[b * G:(b + 1) * G], int(o))[1]
                      for b, o in enumerate(orders)], 1)


def test_compensation_with_identity_h_is_per_block_quantization():
    W = torch.randn(16, 512, generator=torch.Generator().manual_seed(5))
    res = quant_dllm(W, torch.eye(512), abmp_ratio=0.25, refine_rounds=0)
    assert sorted(res.orders.tolist()) == [1, 2, 2, 3]
    d = torch.full((512,), 1 / math.sqrt(1.01))
    torch.testing.assert_close(res.weight, per_block(W, d, res.orders), rtol=0, atol=0)
    assert [c.order for c in res.codes] == res.orders.tolist()
    assert res.bits_per_weight == pytest.approx(8 * (16 * 128 + 16 * 144) / (16 * 512))


def test_compensation_lowers_output_error_on_correlated_inputs():
    X = correlated_inputs(1024, 512, 32, seed=6)
    H = 2 / 1024 * X.T @ X
    W = torch.randn(32, 512, generator=torch.Generator().manual_seed(7))
    res = quant_dllm(W, H, refine_rounds=0)
    U, _ = inverse_cholesky(H)
    plain = per_block(W, U.diagonal(), res.orders)
    assert output_error(X, W, res.weight) < 0.75 * output_error(X, W, plain)


# --- DAQ's output-aware refinement ---

def correlated_block(seed: int, n: int = 32, g: int = 128) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(X, W_b, U_bb) for one block whose inputs are correlated."""
    X = correlated_inputs(1024, g, 16, seed=seed)
    W = torch.randn(n, g, generator=torch.Generator().manual_seed(seed + 1))
    U, _ = inverse_cholesky(2 / 1024 * X.T @ X)
    return X, W, U


def test_sign_pass_without_feedback_is_the_joint_sign_update():
    """With a diagonal U no error is fed forward, so each element takes its nearest level."""
    W, _ = salient_block(11)
    code, _ = daq_block(W, torch.ones(128), 3)
    U = torch.diag(torch.rand(128, generator=torch.Generator().manual_seed(12)) + 0.5)
    signs, Q, err = assign_signs(W, U, code.alpha_r, code.alpha_c)
    assert torch.equal(signs, update_signs(W, code.alpha_r, code.alpha_c))
    torch.testing.assert_close(Q, reconstruct(code.alpha_r, code.alpha_c, signs))
    torch.testing.assert_close(err, (W - Q) / U.diagonal())


def test_scale_refit_is_the_least_squares_optimum():
    """After the refit, the output loss has zero gradient in the plane updated last, and is no higher."""
    _, W, U = correlated_block(13)
    code, _ = daq_block(W, U.diagonal(), 2)
    signs = code.signs.float() * 2 - 1
    Uinv = torch.linalg.solve_triangular(U, torch.eye(128), upper=True)

    def loss(alpha_r: torch.Tensor, alpha_c: torch.Tensor) -> torch.Tensor:
        return ((W - reconstruct(alpha_r, alpha_c, signs)) @ Uinv).square().sum()

    alpha_r, alpha_c = refit_scales(W, Uinv @ Uinv.T, signs, code.alpha_r, code.alpha_c)
    assert loss(alpha_r, alpha_c) < 0.9 * loss(code.alpha_r, code.alpha_c)
    alpha_c = alpha_c.double().requires_grad_()
    value = ((W.double() - reconstruct(alpha_r.double(), alpha_c, signs.double())) @ Uinv.double()).square().sum()
    (grad,) = torch.autograd.grad(value, alpha_c)
    assert grad[-1].abs().max() < 1e-3 * value.item() / alpha_c[-1].abs().mean().item()


@pytest.mark.parametrize("order", [1, 2, 3])
def test_refinement_lowers_the_block_output_loss(order):
    X, W, U = correlated_block(14 + order)
    code, Q = daq_block(W, U.diagonal(), order)
    refined, Q2, err = refine_block(W, U, code, Q, rounds=3)
    torch.testing.assert_close(err, block_error(W, Q2, U), rtol=1e-4, atol=1e-4 * err.abs().max().item())
    torch.testing.assert_close(Q2, reconstruct(refined.alpha_r, refined.alpha_c, refined.signs.float() * 2 - 1))
    assert torch.equal(refined.alpha_r.half().float(), refined.alpha_r)
    assert torch.equal(refined.alpha_c.half().float(), refined.alpha_c)
    assert refined.order == order
    assert err.square().sum() < 0.7 * block_error(W, Q, U).square().sum()
    assert refine_block(W, U, code, Q, rounds=0)[1] is Q


def test_refined_quant_dllm_beats_gptq_on_correlated_inputs():
    X = correlated_inputs(1024, 512, 32, seed=18)
    H = 2 / 1024 * X.T @ X
    W = torch.randn(64, 512, generator=torch.Generator().manual_seed(19))
    refined = output_error(X, W, quant_dllm(W, H).weight)
    assert refined < 0.8 * output_error(X, W, quant_dllm(W, H, refine_rounds=0).weight)
    assert refined < output_error(X, W, gptq(W, H, bits=2).weight)


# --- uniform baselines ---

def test_rtn_levels_lie_in_each_group_range():
    W = torch.randn(8, 256, generator=torch.Generator().manual_seed(8))
    res = rtn(W, bits=2, group_size=128)
    assert res.bits_per_weight == 2.25
    w, q = W.reshape(8, 2, 128), res.weight.reshape(8, 2, 128)
    slack = 1e-3 * W.abs().max()
    assert bool((q >= w.amin(-1, keepdim=True) - slack).all() and (q <= w.amax(-1, keepdim=True) + slack).all())
    assert max(len(torch.unique(g)) for g in q.reshape(16, 128)) == 4
    assert (W - res.weight).abs().max() <= (w.amax(-1) - w.amin(-1)).max() / 6 + slack  # half a step


def test_gptq_beats_rtn_on_correlated_inputs():
    X = correlated_inputs(1024, 256, 32, seed=9)
    W = torch.randn(32, 256, generator=torch.Generator().manual_seed(10))
    res = gptq(W, 2 / 1024 * X.T @ X, bits=2)
    assert res.bits_per_weight == 2.25
    assert max(len(torch.unique(g)) for g in res.weight.reshape(64, 128)) <= 4
    assert output_error(X, W, res.weight) < 0.5 * output_error(X, W, rtn(W).weight)
