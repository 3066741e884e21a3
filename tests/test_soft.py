"""sqlm.soft: the soft-Q view of logits against the naive formulas (values and gradients)."""

import pytest
import torch

from sqlm.soft import (
    check_tau,
    entropy_chunked,
    logsumexp_chunked,
    path_mask,
    shaped_rewards,
    soft_outputs,
)


def naive(logits, actions, tau):
    z = logits.float()
    lse = torch.logsumexp(z, -1)
    z_a = z.gather(-1, actions.clamp(min=0)[..., None]).squeeze(-1)
    logp = torch.log_softmax(z, -1)
    ent = -(logp.exp() * logp).sum(-1)
    return tau * z_a, tau * lse, z_a - lse, ent


@pytest.mark.parametrize("chunk_size", [None, 1, 3, 64])
@pytest.mark.parametrize("tau", [1.0, 0.37])
def test_soft_outputs_equal_naive_formulas(gen, chunk_size, tau):
    logits = torch.randn(3, 5, 11, generator=gen) * 4
    actions = torch.randint(0, 11, (3, 5), generator=gen)
    out = soft_outputs(logits, actions, tau, with_entropy=True, chunk_size=chunk_size)
    q, v, lp, ent = naive(logits, actions, tau)
    for got, want in [(out.q, q), (out.v, v), (out.log_pi, lp), (out.entropy, ent)]:
        assert got.dtype == torch.float32 and got.shape == (3, 5)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # tau * log pi = Q - V
    torch.testing.assert_close(tau * out.log_pi, out.q - out.v, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("chunk_size", [None, 2])
def test_soft_outputs_gradients_equal_naive(gen, chunk_size):
    logits = (torch.randn(2, 7, 13, generator=gen) * 3).requires_grad_()
    actions = torch.randint(0, 13, (2, 7), generator=gen)
    wq, wv, wl = (torch.randn(2, 7, generator=gen) for _ in range(3))
    out = soft_outputs(logits, actions, 0.5, chunk_size=chunk_size)
    (g,) = torch.autograd.grad((out.q * wq + out.v * wv + out.log_pi * wl).sum(), logits)
    ref = logits.detach().clone().requires_grad_()
    q, v, lp, _ = naive(ref, actions, 0.5)
    (g_ref,) = torch.autograd.grad((q * wq + v * wv + lp * wl).sum(), ref)
    torch.testing.assert_close(g, g_ref, atol=1e-5, rtol=1e-5)


def test_soft_outputs_bf16_input_computed_in_fp32(gen):
    logits = (torch.randn(2, 4, 9, generator=gen) * 5).bfloat16()
    actions = torch.randint(0, 9, (2, 4), generator=gen)
    out = soft_outputs(logits, actions, 1.0, chunk_size=3)
    q, v, lp, _ = naive(logits.float(), actions, 1.0)  # the same bf16 values, read in fp32
    assert out.v.dtype == torch.float32
    torch.testing.assert_close(out.v, v, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.log_pi, lp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.q, q, atol=1e-5, rtol=1e-5)


def test_negative_action_ids_read_as_token_zero(gen):
    logits = torch.randn(1, 3, 5, generator=gen)
    acts = torch.tensor([[2, -100, 4]])
    out = soft_outputs(logits, acts, 1.0)
    torch.testing.assert_close(out.q[0, 1], logits[0, 1, 0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk_size", [None, 1, 4])
def test_logsumexp_chunked_equals_torch(gen, dtype, chunk_size):
    x = (torch.randn(3, 6, 17, generator=gen) * 6).to(dtype)
    w = torch.randn(3, 6, generator=gen)
    a = x.clone().requires_grad_()
    got = logsumexp_chunked(a, chunk_size=chunk_size)
    assert got.dtype == torch.float32 and got.shape == (3, 6)
    (ga,) = torch.autograd.grad((got * w).sum(), a)
    b = x.float().clone().requires_grad_()
    want = torch.logsumexp(b, -1)
    (gb,) = torch.autograd.grad((want * w).sum(), b)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert ga.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(ga, gb, atol=1e-6, rtol=1e-5)
    else:  # the fp32 gradient, rounded once to bf16
        torch.testing.assert_close(ga, gb.to(dtype), atol=0, rtol=0)


def test_logsumexp_chunked_extreme_values():
    x = torch.tensor([[1e4, 1e4 - 1.0, -1e4], [-1e4, -1e4, -1e4]])
    torch.testing.assert_close(logsumexp_chunked(x), torch.logsumexp(x, -1))
    assert torch.isfinite(logsumexp_chunked(x)).all()


def test_entropy_chunked(gen):
    x = torch.randn(4, 10, generator=gen)
    p = torch.softmax(x, -1)
    torch.testing.assert_close(entropy_chunked(x, chunk_size=3), -(p * p.log()).sum(-1), atol=1e-6, rtol=1e-5)


def test_shaped_rewards(gen):
    r = torch.randn(2, 3, generator=gen)
    ref = torch.randn(2, 3, generator=gen)
    torch.testing.assert_close(shaped_rewards(r, 0.5, ref), r + 0.5 * ref)
    torch.testing.assert_close(shaped_rewards(r, 0.5), r)
    with pytest.raises(ValueError, match="ref_log_pi"):
        shaped_rewards(r, 0.5, ref[:, :2])


def test_path_mask_cuts_after_first_eos():
    actions = torch.tensor([[5, 1, 2, 9, 3, 9], [5, 5, 1, 1, 1, 1], [5, 9, 1, 9, 1, 1]])
    action_mask = torch.tensor([[0, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]])
    got = path_mask(actions, action_mask, eos_token_id=9)
    want = torch.tensor([[0, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 0], [1, 1, 0, 0, 0, 0]]).float()
    torch.testing.assert_close(got, want)
    # an EOS inside the prompt (mask 0) does not end the path
    got = path_mask(torch.tensor([[9, 1, 9, 2]]), torch.tensor([[0, 1, 1, 1]]), eos_token_id=9)
    torch.testing.assert_close(got, torch.tensor([[0.0, 1, 1, 0]]))
    # several EOS ids, and no EOS at all
    got = path_mask(torch.tensor([[1, 7, 2, 9]]), torch.ones(1, 4), eos_token_id=[9, 7])
    torch.testing.assert_close(got, torch.tensor([[1.0, 1, 0, 0]]))
    torch.testing.assert_close(path_mask(actions, action_mask, None), action_mask.float())


@pytest.mark.parametrize("tau", [0, 0.0, -1.0, float("nan"), True, "1", None])
def test_bad_tau_names_tau(tau):
    with pytest.raises(ValueError, match="tau"):
        check_tau(tau)
    with pytest.raises(ValueError, match="tau"):
        soft_outputs(torch.zeros(1, 2, 3), torch.zeros(1, 2, dtype=torch.long), tau)


def test_bad_shapes_name_the_argument():
    with pytest.raises(ValueError, match="logits"):
        soft_outputs(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), 1.0)
    with pytest.raises(ValueError, match="actions"):
        soft_outputs(torch.zeros(2, 3, 4), torch.zeros(2, 4, dtype=torch.long), 1.0)
    with pytest.raises(ValueError, match="chunk_size"):
        soft_outputs(torch.zeros(2, 3, 4), torch.zeros(2, 3, dtype=torch.long), 1.0, chunk_size=0)


def test_fold_rewards_into_path_moves_what_lies_after_the_end_onto_the_last_step():
    from sqlm.soft import fold_rewards_into_path

    rewards = torch.tensor([[0.0, 0.5, 0.0, 1.0, 2.0], [0.0, 0.0, 3.0, 0.0, 0.0], [7.0, 0.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[0, 1, 1, 0, 0], [0, 1, 1, 1, 0], [0, 0, 0, 0, 0]]).float()
    out = fold_rewards_into_path(rewards, mask)
    assert out.tolist() == [[0.0, 0.5, 3.0, 0.0, 0.0], [0.0, 0.0, 3.0, 0.0, 0.0], [7.0, 0.0, 0.0, 0.0, 0.0]]
    assert torch.equal(fold_rewards_into_path(out, mask), out)  # idempotent
    assert out.sum(-1)[:2].tolist() == rewards.sum(-1)[:2].tolist()  # nothing lost
