"""sqlm.losses: O(T) sums against naive loops, padding/EOS invariance, reductions, bad input."""

import pytest
import torch
from conftest import contiguous_mask

from sqlm.losses import (
    LOSSES,
    REDUCTIONS,
    advantage_pcl_loss,
    discounted_reverse_cumsum,
    multistep_pcl_loss,
    path_consistency,
    pcl_loss,
    reduce_loss,
    soft_q_loss,
    unified_pcl_loss,
    window_sums,
)
from sqlm.soft import path_mask, soft_outputs


# ----------------------------------------------------------------------------- naive references


def naive_window(x, gamma, d):
    b, t = x.shape
    out = torch.zeros(b, t, dtype=torch.float64)
    for i in range(t):
        n = t - i if d is None else min(d, t - i)
        for j in range(n):
            out[:, i] += gamma**j * x[:, i + j].double()
    return out


def naive_consistency(values, log_pi, rewards, mask, tau, gamma, d, ref=None):
    """C(i, d) by the seed's formula, one path step at a time (V past the path end is 0)."""
    b_n, t_n = values.shape
    c = torch.zeros(b_n, t_n, dtype=torch.float64)
    for b in range(b_n):
        steps = [t for t in range(t_n) if mask[b, t] > 0]
        for k, i in enumerate(steps):
            seg = steps[k:] if d is None else steps[k : k + d]
            total = -float(values[b, i])
            for j, s in enumerate(seg):
                r = float(rewards[b, s]) + (tau * float(ref[b, s]) if ref is not None else 0.0)
                total += gamma**j * (r - tau * float(log_pi[b, s]))
            if d is not None and k + d < len(steps):
                total += gamma**d * float(values[b, steps[k + d]])
            c[b, i] = total
    return c


def random_batch(gen, b=3, t=7):
    values = torch.randn(b, t, generator=gen, dtype=torch.float64)
    log_pi = -torch.rand(b, t, generator=gen, dtype=torch.float64) * 3
    rewards = torch.randn(b, t, generator=gen, dtype=torch.float64)
    ref = -torch.rand(b, t, generator=gen, dtype=torch.float64) * 3
    mask = contiguous_mask([5, 7, 2], t, starts=[2, 0, 1])[:b]
    return values, log_pi, rewards, ref, mask


# ----------------------------------------------------------------------------- O(T) sums


@pytest.mark.parametrize("gamma", [1.0, 0.9, 0.5, 0.01])
@pytest.mark.parametrize("d", [1, 2, 3, 6, 7, 50, None])
def test_window_sums_equal_naive_loop(gen, gamma, d):
    x = torch.randn(4, 7, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(window_sums(x, gamma, d), naive_window(x, gamma, d), atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("gamma", [0.999, 0.95, 0.5])
def test_discounted_reverse_cumsum_long_paths_across_blocks(gen, gamma):
    x = torch.randn(2, 400, generator=gen, dtype=torch.float64)
    want = torch.zeros_like(x)
    acc = torch.zeros(2, dtype=torch.float64)
    for t in range(399, -1, -1):
        acc = x[:, t] + gamma * acc
        want[:, t] = acc
    torch.testing.assert_close(discounted_reverse_cumsum(x, gamma), want, atol=1e-9, rtol=1e-9)
    # gradients flow and are the transposed recursion: dG_t/dx_s = gamma^(s-t) for s >= t
    xr = x.clone().requires_grad_()
    discounted_reverse_cumsum(xr, gamma)[:, 0].sum().backward()
    torch.testing.assert_close(xr.grad[0], gamma ** torch.arange(400, dtype=torch.float64), atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("gamma", [1.0, 0.8])
@pytest.mark.parametrize("d", [1, 2, 4, None])
@pytest.mark.parametrize("with_ref", [False, True])
def test_path_consistency_equals_seed_formula(gen, gamma, d, with_ref):
    values, log_pi, rewards, ref, mask = random_batch(gen)
    ref = ref if with_ref else None
    c = path_consistency(values, log_pi, rewards, mask, tau=0.7, gamma=gamma, d=d, ref_log_pi=ref)
    want = naive_consistency(values, log_pi, rewards, mask, 0.7, gamma, d, ref)
    torch.testing.assert_close(c.double(), want, atol=1e-5, rtol=1e-5)
    assert (c[mask == 0] == 0).all()


def test_each_loss_equals_its_equation(gen):
    """Per-step losses against the docstring equations written out by hand."""
    tau, gamma = 0.6, 0.9
    q = torch.randn(2, 5, generator=gen)
    v = torch.randn(2, 5, generator=gen)
    vbar = torch.randn(2, 5, generator=gen)
    r = torch.randn(2, 5, generator=gen)
    ref = -torch.rand(2, 5, generator=gen)
    m = contiguous_mask([4, 2], 5, starts=[1, 0])
    rt = r + tau * ref
    a = q - v

    def nxt(x):  # x_{t+1} on the path, 0 past its end
        y = torch.zeros_like(x)
        y[:, :-1] = (x * m)[:, 1:]
        return y * m

    soft_q = 0.5 * (q - rt - gamma * nxt(vbar)) ** 2 * m
    adv = 0.5 * (-vbar + gamma * nxt(vbar) + rt - a) ** 2 * m
    g = torch.zeros_like(r)
    acc = torch.zeros(2)
    for t in range(4, -1, -1):
        acc = ((rt - a) * m)[:, t] + gamma * acc
        g[:, t] = acc
    multi = 0.5 * (-vbar + g) ** 2 * m
    kw = dict(tau=tau, gamma=gamma, ref_log_pi=ref, reduction="none")
    torch.testing.assert_close(soft_q_loss(q, v, vbar, r, m, **kw)[0], soft_q, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(advantage_pcl_loss(q, v, vbar, r, m, **kw)[0], adv, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(multistep_pcl_loss(q, v, vbar, r, m, **kw)[0], multi, atol=1e-5, rtol=1e-5)
    # no target: the online values, detached
    torch.testing.assert_close(soft_q_loss(q, v, None, r, m, **kw)[0], soft_q_loss(q, v, v, r, m, **kw)[0])
    # unified PCL is PCL with V from the logits and tau log pi = Q - V
    for d in (1, 3, None):
        u = unified_pcl_loss(q, v, r, m, tau=tau, gamma=gamma, d=d, ref_log_pi=ref, reduction="none")[0]
        p = pcl_loss((q - v) / tau, v, r, m, tau=tau, gamma=gamma, d=d, ref_log_pi=ref, reduction="none")[0]
        torch.testing.assert_close(u, p)
        c = naive_consistency(v, (q - v) / tau, r, m, tau, gamma, d, ref).float()
        torch.testing.assert_close(u, 0.5 * c**2, atol=1e-5, rtol=1e-5)


def test_gradients_only_through_the_online_terms(gen):
    q = torch.randn(2, 4, generator=gen, requires_grad=True)
    v = torch.randn(2, 4, generator=gen, requires_grad=True)
    vbar = torch.randn(2, 4, generator=gen, requires_grad=True)
    r, m = torch.randn(2, 4, generator=gen), torch.ones(2, 4)
    for fn in (soft_q_loss, advantage_pcl_loss, multistep_pcl_loss):
        loss, _ = fn(q, v, vbar, r, m, tau=1.0)
        gq, gv, gbar = torch.autograd.grad(loss, (q, v, vbar), allow_unused=True, materialize_grads=True)
        assert gq.abs().sum() > 0
        assert gbar.abs().sum() == 0  # the target never gets a gradient
        if fn is soft_q_loss:
            assert gv.abs().sum() == 0  # only Q(s_i, a_i) is regressed
        else:
            torch.testing.assert_close(gv, -gq)  # A = Q - V


# ----------------------------------------------------------------------------- masks and reductions


def _loss_inputs(logits, actions, mask, tau, ref, rewards, vbar, values):
    so = soft_outputs(logits, actions, tau, with_entropy=True)
    return {
        "pcl": lambda **kw: pcl_loss(so.log_pi, values, rewards, mask, ref_log_pi=ref, entropy=so.entropy, **kw),
        "unified_pcl": lambda **kw: unified_pcl_loss(
            so.q, so.v, rewards, mask, ref_log_pi=ref, entropy=so.entropy, **kw
        ),
        "soft_q": lambda **kw: soft_q_loss(so.q, so.v, vbar, rewards, mask, ref_log_pi=ref, **kw),
        "group_pcl": lambda **kw: LOSSES["group_pcl"](
            so.q, so.v, rewards, mask, group=torch.zeros(mask.shape[0], dtype=torch.long), ref_log_pi=ref, **kw
        ),
        "multistep_soft_q": lambda **kw: LOSSES["multistep_soft_q"](so.q, so.v, rewards, mask, ref_log_pi=ref, **kw),
        "tbrm": lambda **kw: LOSSES["tbrm"](so.q, so.v, rewards, mask, ref_log_pi=ref, **kw),
        "advantage_pcl": lambda **kw: advantage_pcl_loss(so.q, so.v, vbar, rewards, mask, ref_log_pi=ref, **kw),
        "multistep_pcl": lambda **kw: multistep_pcl_loss(so.q, so.v, vbar, rewards, mask, ref_log_pi=ref, **kw),
        **{
            name: (lambda fn: lambda **kw: fn(so.q, so.v, vbar, rewards, mask, ref_log_pi=ref, **kw))(LOSSES[name])
            for name in ("advantage_pcl_mix", "multistep_pcl_mix", "guo_pcl_mix")
        },
    }


@pytest.mark.parametrize("loss_type", sorted(LOSSES))
@pytest.mark.parametrize("reduction", ["token", "sequence", "sequence_mean", "sum"])
@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_padding_prompt_and_tokens_after_eos_do_not_change_the_loss(gen, loss_type, reduction, gamma):
    """A bare path == the same path after a prompt, followed by EOS, junk tokens and padding."""
    vocab, eos, tau, n = 6, 5, 0.8, 4
    bare_logits = torch.randn(1, n, vocab, generator=gen) * 2
    bare_actions = torch.tensor([[1, 3, 0, eos]])
    bare = [torch.randn(1, n, generator=gen) for _ in range(4)]  # ref, rewards, vbar, values
    # the padded row: 2 prompt steps, the path, 2 junk tokens after EOS, 2 padding steps
    p, junk, pad = 2, 2, 2
    width = p + n + junk + pad

    def embed(x, fill):
        out = torch.randn((1, width) + x.shape[2:], generator=gen) * fill
        out[:, p : p + n] = x
        return out

    logits = embed(bare_logits, 3.0)
    actions = torch.randint(0, vocab, (1, width), generator=gen)
    actions[:, p : p + n] = bare_actions
    action_mask = torch.zeros(1, width)
    action_mask[:, p : p + n + junk] = 1.0  # junk after EOS is still "completion": path_mask cuts it
    mask = path_mask(actions, action_mask, eos)
    assert mask.sum() == n
    padded = [embed(x, 5.0) for x in bare]
    kw = dict(tau=tau, gamma=gamma, reduction=reduction)
    if loss_type in ("pcl", "unified_pcl", "multistep_soft_q"):
        for d in (1, 2, None):
            a, sa = _loss_inputs(bare_logits, bare_actions, torch.ones(1, n), tau, *bare)[loss_type](d=d, **kw)
            b, sb = _loss_inputs(logits, actions, mask, tau, *padded)[loss_type](d=d, **kw)
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
            assert sa.keys() == sb.keys()
            for key in sa:
                assert sa[key] == pytest.approx(sb[key], abs=1e-5), key
    else:
        a, sa = _loss_inputs(bare_logits, bare_actions, torch.ones(1, n), tau, *bare)[loss_type](**kw)
        b, sb = _loss_inputs(logits, actions, mask, tau, *padded)[loss_type](**kw)
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        for key in sa:
            assert sa[key] == pytest.approx(sb[key], abs=1e-5), key


@pytest.mark.parametrize("loss_type", sorted(LOSSES))
def test_padded_steps_get_no_gradient(gen, loss_type):
    logits = torch.randn(2, 6, 5, generator=gen, requires_grad=True)
    actions = torch.randint(0, 5, (2, 6), generator=gen)
    mask = contiguous_mask([3, 5], 6, starts=[1, 0])
    ins = _loss_inputs(
        logits,
        actions,
        mask,
        1.0,
        None,
        torch.randn(2, 6, generator=gen),
        torch.randn(2, 6, generator=gen),
        torch.randn(2, 6, generator=gen),
    )
    loss, _ = ins[loss_type](tau=1.0)
    (g,) = torch.autograd.grad(loss, logits)
    assert g[mask == 0].abs().sum() == 0
    assert g[mask == 1].abs().sum() > 0


def test_reductions(gen):
    per = torch.rand(3, 5, generator=gen)
    m = contiguous_mask([2, 5, 1], 5, starts=[1, 0, 4])
    pm = per * m
    torch.testing.assert_close(reduce_loss(per, m, "token"), pm.sum() / m.sum())
    torch.testing.assert_close(reduce_loss(per, m, "sequence"), pm.sum(-1).mean())
    torch.testing.assert_close(reduce_loss(per, m, "sequence_mean"), (pm.sum(-1) / m.sum(-1)).mean())
    torch.testing.assert_close(reduce_loss(per, m, "sum"), pm.sum())
    torch.testing.assert_close(reduce_loss(per, m, "none"), pm)
    assert set(REDUCTIONS) == {"token", "sequence", "sequence_mean", "sum", "none"}
    with pytest.raises(ValueError, match="reduction"):
        reduce_loss(per, m, "mean")
    # an all-masked batch gives 0, not NaN
    assert reduce_loss(per, torch.zeros(3, 5), "token") == 0


def test_stats(gen):
    values, log_pi, rewards, ref, mask = random_batch(gen)
    ent = torch.rand(3, 7, generator=gen)
    _, stats = pcl_loss(log_pi, values, rewards, mask, tau=1.0, ref_log_pi=ref, entropy=ent)
    c = path_consistency(values, log_pi, rewards, mask, tau=1.0, ref_log_pi=ref)
    assert stats["consistency"] == pytest.approx(float((c.abs() * mask).sum() / mask.sum()), rel=1e-5)
    assert stats["v_start"] == pytest.approx(float((values[0, 2] + values[1, 0] + values[2, 1]) / 3), rel=1e-5)
    assert stats["entropy"] == pytest.approx(float((ent * mask).sum() / mask.sum()), rel=1e-5)
    kl = ((log_pi - ref) * mask).sum(-1).mean()
    assert stats["kl_ref"] == pytest.approx(float(kl), rel=1e-5)
    _, no_ref = pcl_loss(log_pi, values, rewards, mask, tau=1.0)
    assert "kl_ref" not in no_ref and "entropy" not in no_ref


# ----------------------------------------------------------------------------- bad input


def _call(loss_type, b=2, t=3, **kw):
    x = torch.zeros(b, t)
    m = torch.ones(b, t)
    if loss_type in ("pcl", "unified_pcl", "multistep_soft_q", "tbrm"):
        return LOSSES[loss_type](x, x, x, m, **kw)
    if loss_type == "group_pcl":
        return LOSSES[loss_type](x, x, x, m, group=torch.zeros(b, dtype=torch.long), **kw)
    return LOSSES[loss_type](x, x, x, x, m, **kw)


@pytest.mark.parametrize("loss_type", sorted(LOSSES))
def test_bad_scalars_name_the_argument(loss_type):
    for tau in (0, -0.5, float("nan")):
        with pytest.raises(ValueError, match="tau"):
            _call(loss_type, tau=tau)
    for gamma in (0, 0.0, -0.1, 1.01, 2, True):
        with pytest.raises(ValueError, match="gamma"):
            _call(loss_type, tau=1.0, gamma=gamma)
    if loss_type in ("pcl", "unified_pcl", "multistep_soft_q"):
        for d in (0, -1, 1.5, True):
            with pytest.raises(ValueError, match="d "):
                _call(loss_type, tau=1.0, d=d)
    with pytest.raises(ValueError, match="reduction"):
        _call(loss_type, tau=1.0, reduction="avg")


@pytest.mark.parametrize("loss_type", sorted(LOSSES))
def test_bad_shapes_name_the_argument(loss_type):
    x, m = torch.zeros(2, 3), torch.ones(2, 3)
    if loss_type == "group_pcl":
        g = torch.zeros(2, dtype=torch.long)
        with pytest.raises(ValueError, match="rewards"):
            LOSSES[loss_type](x, x, torch.zeros(2, 4), m, group=g, tau=1.0)
        with pytest.raises(ValueError, match="group"):
            LOSSES[loss_type](x, x, x, m, group=torch.zeros(3, dtype=torch.long), tau=1.0)
    elif loss_type in ("pcl", "unified_pcl", "multistep_soft_q", "tbrm"):
        with pytest.raises(ValueError, match="rewards"):
            LOSSES[loss_type](x, x, torch.zeros(2, 4), m, tau=1.0)
        with pytest.raises(ValueError, match="mask"):
            LOSSES[loss_type](x, x, x, torch.ones(3, 3), tau=1.0)
        with pytest.raises(ValueError, match=r"\[B, T\]"):
            LOSSES[loss_type](torch.zeros(6), torch.zeros(6), torch.zeros(6), torch.ones(6), tau=1.0)
    else:
        with pytest.raises(ValueError, match="target_v"):
            LOSSES[loss_type](x, x, torch.zeros(2, 2), x, m, tau=1.0)
        with pytest.raises(ValueError, match="rewards"):
            LOSSES[loss_type](x, x, None, torch.zeros(1, 3), m, tau=1.0)
    with pytest.raises(ValueError, match="ref_log_pi"):
        _call(loss_type, tau=1.0, ref_log_pi=torch.zeros(2, 5))


@pytest.mark.parametrize("loss_type", ["advantage_pcl", "multistep_pcl"])
def test_advantage_forms_never_move_the_level_of_v(gen, loss_type):
    """Guo et al.'s forms regress A = Q - V only: the logit gradient sums to 0 over the vocabulary
    at every state, so no step pushes V = tau logsumexp z towards V* directly (the convergence
    tests show what that costs). Unified PCL's gradient does move the level."""
    logits = torch.randn(2, 5, 6, generator=gen, requires_grad=True)
    actions = torch.randint(0, 6, (2, 5), generator=gen)
    r, vbar, m = torch.randn(2, 5, generator=gen), torch.randn(2, 5, generator=gen), torch.ones(2, 5)
    so = soft_outputs(logits, actions, 0.7)
    loss, _ = LOSSES[loss_type](so.q, so.v, vbar, r, m, tau=0.7)
    (g,) = torch.autograd.grad(loss, logits)
    torch.testing.assert_close(g.sum(-1), torch.zeros(2, 5), atol=1e-6, rtol=0)
    so = soft_outputs(logits, actions, 0.7)
    (g,) = torch.autograd.grad(unified_pcl_loss(so.q, so.v, r, m, tau=0.7)[0], logits)
    assert g.sum(-1).abs().max() > 1e-3


@pytest.mark.parametrize("reduction", ["token", "sequence", "sequence_mean"])
def test_an_empty_row_does_not_dilute_the_mean(reduction):
    """A row with no path step (padding in a batch) must not count as a path in the mean."""
    from sqlm.losses import reduce_loss

    torch.manual_seed(0)
    per_step = torch.rand(3, 5)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 1, 1, 0, 0]], dtype=torch.float)
    bare = reduce_loss(per_step, mask, reduction)
    padded = reduce_loss(torch.cat([per_step, torch.rand(1, 5)]), torch.cat([mask, torch.zeros(1, 5)]), reduction)
    assert torch.allclose(bare, padded)


def test_d_accepts_numpy_integers():
    import numpy as np

    from sqlm.losses import check_d

    assert check_d(np.int64(3)) == 3 and type(check_d(np.int64(3))) is int
    with pytest.raises(ValueError, match="d"):
        check_d(np.float64(2.0))


# ----------------------------------------------------------------------------- registry and normaliser


@pytest.mark.parametrize("loss_type", sorted(LOSSES))
def test_every_registry_entry_takes_one_signature_and_equals_its_loss(loss_type):
    """``LOSS_SPECS[name](soft, rewards, mask, value=, target_v=, d=, ...)`` is the loss called with
    exactly what it reads: the value head's V for pcl, the target's V_bar for the target losses, d
    only where the loss uses it."""
    from sqlm.losses import LOSS_SPECS

    gen = torch.Generator().manual_seed(3)
    b, t, vocab, tau = 3, 6, 7, 0.7
    logits = torch.randn(b, t, vocab, generator=gen)
    actions = torch.randint(0, vocab, (b, t), generator=gen)
    mask = contiguous_mask([6, 4, 2], t, starts=[0, 1, 3])
    rewards, ref = torch.randn(b, t, generator=gen), -torch.rand(b, t, generator=gen)
    vbar, values = torch.randn(b, t, generator=gen), torch.randn(b, t, generator=gen)
    so = soft_outputs(logits, actions, tau, with_entropy=True)
    kw = dict(tau=tau, gamma=0.9, reduction="sequence")
    direct = _loss_inputs(logits, actions, mask, tau, ref, rewards, vbar, values)[loss_type]
    spec = LOSS_SPECS[loss_type]
    assert spec.fn is LOSSES[loss_type]
    group = torch.zeros(b, dtype=torch.long)
    got, stats = spec(so, rewards, mask, value=values, target_v=vbar, d=2, ref_log_pi=ref, group=group, **kw)
    want, want_stats = direct(d=2, **kw) if spec.uses_d else direct(**kw)
    torch.testing.assert_close(got, want)
    assert "entropy" in stats and {k: stats[k] for k in want_stats} == pytest.approx(want_stats)
    assert spec.needs_value_head == (loss_type == "pcl")
    if spec.needs_value_head:
        with pytest.raises(ValueError, match="value"):
            spec(so, rewards, mask, tau=tau)


def test_loss_spec_names_the_known_losses():
    from sqlm.losses import loss_spec

    assert loss_spec("soft_q").needs_target and not loss_spec("unified_pcl").needs_target
    with pytest.raises(ValueError, match="loss_type must be one of"):
        loss_spec("dpo")


@pytest.mark.parametrize("reduction", ["token", "sequence", "sequence_mean"])
def test_summed_parts_over_summed_normalisers_equal_the_whole_batch(reduction):
    """How the trainer splits a batch (gradient accumulation, processes): the sum of every part's
    ``reduced_sum`` over the sum of their ``normaliser`` is ``reduce_loss`` of the whole batch."""
    from sqlm.losses import normaliser, reduced_sum

    gen = torch.Generator().manual_seed(4)
    per_step = torch.rand(5, 6, generator=gen)
    mask = contiguous_mask([6, 3, 2, 0, 4], 6, starts=[0, 2, 1, 0, 2])  # row 3: no step
    parts = [slice(0, 2), slice(2, 5)]
    total = sum(normaliser(mask[p], reduction) for p in parts)
    split = sum(reduced_sum(per_step[p], mask[p], reduction) for p in parts) / total
    torch.testing.assert_close(split, reduce_loss(per_step, mask, reduction))
    with pytest.raises(ValueError, match="reduction"):
        normaliser(mask, "sum")


# ----------------------------------------------------------------------------- Guo et al.'s reversed terms


def _original_v2(logits, logits_, actions, rewards, lengths):
    """Guo et al.'s code, ``soft_q_loss_with_sparse_rewards_2`` (tau = 1, sequence rewards on the last
    step), transcribed to plain torch: raw per-step losses ``(A - A_)^2``."""
    q = logits.gather(-1, actions[..., None]).squeeze(-1)
    v = logits.logsumexp(-1)
    a = q - v
    v_ = logits_.logsumexp(-1)
    a_ = torch.zeros_like(q)
    a_[:, :-1] = v_[:, 1:] - v_[:, :-1]
    rows = torch.arange(len(lengths))
    a_[rows, lengths - 1] = rewards - v_[rows, lengths - 1]
    return (a - a_).pow(2)


def _original_v3(logits, logits_, actions, rewards, lengths):
    """``soft_q_loss_with_sparse_rewards_3`` of the same code: ``(sum_{l>=t} A_l - (R - V_(s_t)))^2``."""
    q = logits.gather(-1, actions[..., None]).squeeze(-1)
    a = q - logits.logsumexp(-1)
    keep = (torch.arange(a.shape[1])[None] < lengths[:, None]).float()
    a2 = (a * keep).flip(-1).cumsum(-1).flip(-1)
    return (a2 - (rewards[:, None] - logits_.logsumexp(-1))).pow(2)


@pytest.mark.parametrize("form", ["advantage_pcl_mix", "multistep_pcl_mix", "guo_pcl_mix"])
@pytest.mark.parametrize("c", [1.0, 0.5, 0.0])
def test_guo_mixes_match_the_original_code_in_value_and_gradient(form, c):
    """The mixes are the original ``v2_v2r`` / ``v3_v3r`` / ``v2_v2r_v3_v3r`` with coefficient c:
    ``c * L(online, target) + (1 - c) * L(target, online)``, the reversed call regressing the online
    values (gradient through them) on the target's advantages. sqlm's per-step loss is half the
    original's squared error."""
    gen = torch.Generator().manual_seed(7)
    b, t, vocab = 3, 5, 6
    logits = torch.randn(b, t, vocab, generator=gen, requires_grad=True)
    target = torch.randn(b, t, vocab, generator=gen)
    actions = torch.randint(0, vocab, (b, t), generator=gen)
    lengths = torch.tensor([5, 3, 1])
    mask = contiguous_mask(lengths.tolist(), t)
    seq_r = torch.randn(b, generator=gen)
    rewards = torch.zeros(b, t)
    rewards[torch.arange(b), lengths - 1] = seq_r

    def original(fn):
        return c * fn(logits, target, actions, seq_r, lengths) + (1 - c) * fn(target, logits, actions, seq_r, lengths)

    if form == "advantage_pcl_mix":
        want = original(_original_v2)
    elif form == "multistep_pcl_mix":
        want = original(_original_v3)
    else:
        want = (original(_original_v2) + original(_original_v3)) / 2
    so, tso = soft_outputs(logits, actions, 1.0), soft_outputs(target, actions, 1.0)
    got, _ = LOSSES[form](
        so.q, so.v, tso.v, rewards, mask, tau=1.0, target_log_pi=tso.log_pi, coefficient=c, reduction="none"
    )
    torch.testing.assert_close(2 * got, want * mask, atol=1e-5, rtol=1e-5)
    (g_got,) = torch.autograd.grad(got.sum(), logits)
    (g_want,) = torch.autograd.grad(0.5 * (want * mask).sum(), logits)
    torch.testing.assert_close(g_got, g_want, atol=1e-5, rtol=1e-5)


def test_guo_mixes_at_coefficient_one_are_the_forward_forms():
    gen = torch.Generator().manual_seed(8)
    q, v, vbar, r = (torch.randn(2, 5, generator=gen) for _ in range(4))
    ref, tlp, m = -torch.rand(2, 5, generator=gen), -torch.rand(2, 5, generator=gen), contiguous_mask([5, 3], 5)
    kw = dict(tau=0.7, gamma=0.9, ref_log_pi=ref)
    for mix, plain in (("advantage_pcl_mix", advantage_pcl_loss), ("multistep_pcl_mix", multistep_pcl_loss)):
        got, _ = LOSSES[mix](q, v, vbar, r, m, target_log_pi=tlp, coefficient=1.0, **kw)
        want, _ = plain(q, v, vbar, r, m, **kw)
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("form", ["advantage_pcl_mix", "multistep_pcl_mix"])
def test_only_the_reversed_terms_move_the_level_of_v(form):
    """The forward term's logit gradient sums to 0 at every state; the reversed term's does not (it
    regresses V_theta itself), which is what lets the mixes reach pi* (tests/test_convergence.py)."""
    gen = torch.Generator().manual_seed(9)
    logits = torch.randn(2, 5, 6, generator=gen, requires_grad=True)
    actions = torch.randint(0, 6, (2, 5), generator=gen)
    r, vbar, tlp = torch.randn(2, 5, generator=gen), torch.randn(2, 5, generator=gen), -torch.rand(2, 5, generator=gen)
    m = torch.ones(2, 5)
    sums = {}
    for c in (1.0, 0.0):
        so = soft_outputs(logits, actions, 0.7)
        loss, _ = LOSSES[form](so.q, so.v, vbar, r, m, tau=0.7, target_log_pi=tlp, coefficient=c)
        (g,) = torch.autograd.grad(loss, logits)
        sums[c] = g.sum(-1).abs().max()
    assert sums[1.0] < 1e-6 and sums[0.0] > 1e-3


def test_guo_coefficient_out_of_range_names_the_argument():
    x, m = torch.zeros(2, 3), torch.ones(2, 3)
    for c in (-0.1, 1.5, True, float("nan")):
        with pytest.raises(ValueError, match="coefficient"):
            LOSSES["guo_pcl_mix"](x, x, x, x, m, tau=1.0, coefficient=c)


@pytest.mark.parametrize("d", [1, 3, None])
def test_multistep_soft_q_is_pcl_residual_with_the_gradient_through_q_only(d):
    """Its residual is minus unified PCL's C(t, d); each step's gradient reaches only Q(s_t, a_t) (on
    the logits: the taken action's logit alone), with weight C(t, d) of that step."""
    gen = torch.Generator().manual_seed(11)
    logits = torch.randn(2, 5, 6, generator=gen, requires_grad=True)
    actions = torch.randint(0, 6, (2, 5), generator=gen)
    r, ref, m = torch.randn(2, 5, generator=gen), -torch.rand(2, 5, generator=gen), contiguous_mask([5, 3], 5)
    so = soft_outputs(logits, actions, 0.7)
    per, _ = LOSSES["multistep_soft_q"](so.q, so.v, r, m, tau=0.7, gamma=0.9, d=d, ref_log_pi=ref, reduction="none")
    c = path_consistency(so.v, so.log_pi, r, m, tau=0.7, gamma=0.9, d=d, ref_log_pi=ref)
    torch.testing.assert_close(per, 0.5 * c.pow(2) * m, atol=1e-5, rtol=1e-5)
    (g,) = torch.autograd.grad(per.sum(), logits)
    want = torch.zeros_like(g)  # d/dz of 1/2 (Q - target)^2 with Q = tau z[a]: -C * tau on the taken action
    want.scatter_(-1, actions[..., None], (-c.detach() * 0.7 * m)[..., None])
    torch.testing.assert_close(g, want, atol=1e-5, rtol=1e-5)


def test_group_pcl_is_the_whole_path_residual_against_its_group_mean(gen):
    """By hand: ``G_i = C_i - group mean`` with ``C_i = -V(s_0) + (R + tau log pi_ref - tau log pi)`` summed
    over the path, loss ``mean_i G_i^2 / 2`` per path; a start value shared by a group cancels (the same
    shift of every logit at the first state of every row changes nothing), and a path alone in its
    group has no loss."""
    from sqlm.losses import group_pcl_loss

    b, t, vocab, tau = 5, 4, 6, 0.3
    logits = torch.randn(b, t, vocab, generator=gen)
    actions = torch.randint(0, vocab, (b, t), generator=gen)
    mask = contiguous_mask([4, 2, 3, 1, 2], t, starts=[0, 1, 0, 2, 1])
    rewards, ref = torch.randn(b, t, generator=gen), -torch.rand(b, t, generator=gen)
    group = torch.tensor([0, 0, 1, 1, 2])

    def loss(lg):
        so = soft_outputs(lg, actions, tau)
        return group_pcl_loss(so.q, so.v, rewards, mask, group=group, tau=tau, ref_log_pi=ref, reduction="sequence")

    so = soft_outputs(logits, actions, tau)
    v0 = so.v[torch.arange(b), mask.argmax(-1)]
    x = ((rewards + tau * ref - tau * so.log_pi) * mask).sum(-1) - v0
    g = torch.stack([x[0] - x[:2].mean(), x[1] - x[:2].mean(), x[2] - x[2:4].mean(), x[3] - x[2:4].mean(), x[4] * 0])
    torch.testing.assert_close(loss(logits)[0], (0.5 * g.pow(2)).sum() / b)
    shifted = logits.clone()
    first = mask.argmax(-1)
    shifted[torch.arange(b), first] += 5.0  # V(s_0) + 5 tau on every row
    torch.testing.assert_close(loss(shifted)[0], loss(logits)[0])


def test_tbrm_is_one_whole_path_residual_per_path_from_the_logits_start_value(gen):
    """By hand: ``C_i = -V(s_0) + sum_t (r_t + tau log pi_ref - tau log pi)`` over path i, loss ``mean_i C_i^2 / 2``
    ("sequence") or the same sum over the batch's path steps ("token"); the gradient reaches the first
    state's value (a shift of its logits moves ``V(s_0)`` and so the loss), unlike ``group_pcl`` where it
    cancels; a row without steps has no loss."""
    from sqlm.losses import tbrm_loss

    b, t, vocab, tau = 5, 4, 6, 0.3
    logits = torch.randn(b, t, vocab, generator=gen)
    actions = torch.randint(0, vocab, (b, t), generator=gen)
    mask = contiguous_mask([4, 2, 3, 0, 2], t, starts=[0, 1, 0, 0, 1])
    rewards, ref = torch.randn(b, t, generator=gen), -torch.rand(b, t, generator=gen)

    def loss(lg, reduction="sequence"):
        so = soft_outputs(lg, actions, tau)
        return tbrm_loss(so.q, so.v, rewards, mask, tau=tau, ref_log_pi=ref, reduction=reduction)

    so = soft_outputs(logits, actions, tau)
    v0 = so.v[torch.arange(b), mask.argmax(-1)]
    c = ((rewards + tau * ref - tau * so.log_pi) * mask).sum(-1) - v0
    c = torch.where(mask.sum(-1) > 0, c, torch.zeros_like(c))
    torch.testing.assert_close(loss(logits)[0], (0.5 * c.pow(2)).sum() / 4)  # 4 paths with a step
    torch.testing.assert_close(loss(logits, "token")[0], (0.5 * c.pow(2)).sum() / mask.sum())
    assert loss(logits)[1]["consistency"] == pytest.approx(c.abs()[mask.sum(-1) > 0].mean().item(), rel=1e-5)
    shifted = logits.clone()
    shifted[torch.arange(b), mask.argmax(-1)] += 5.0  # V(s_0) + 5 tau on every row, log pi unchanged
    x = c - 5.0 * tau * (mask.sum(-1) > 0)
    torch.testing.assert_close(loss(shifted)[0], (0.5 * x.pow(2)).sum() / 4)


@pytest.mark.parametrize("loss_type", ["group_pcl", "tbrm"])
def test_under_adam_rescaling_the_reward_is_a_choice_of_tau(loss_type):
    """Guo et al.'s reward shaping maps rewards to a fixed range, ``R -> a R + b``. With ``tau -> a tau`` the
    soft values and ``tau log pi`` scale by ``a`` too; in ``group_pcl`` the offset ``b`` of a terminal reward
    cancels in the group mean, so every residual is ``a`` times the original and the gradient exactly ``a^2``
    times: the same direction. Adam divides each step by its running gradient scale, so it takes the same
    steps (up to its eps): shaping the reward is choosing tau, while the larger tau alone (same reward)
    points the gradient elsewhere.
    ``tbrm`` keeps ``V(s_0)`` in its residual, so there only the scale is free (``b = 0``)."""
    gen = torch.Generator().manual_seed(7)
    b, t, vocab, tau, a = 8, 5, 6, 0.1, 4.0
    init = torch.randn(b, t, vocab, generator=gen)
    actions = torch.randint(0, vocab, (b, t), generator=gen)
    mask = contiguous_mask([5, 3, 4, 2, 5, 1, 3, 4], t)
    last = (mask.cumsum(-1) == mask.sum(-1, keepdim=True)) & mask.bool()
    reward = (torch.rand(b, generator=gen) < 0.5).float()
    ref = -torch.rand(b, t, generator=gen)
    kw = dict(group=torch.arange(b) // 4) if loss_type == "group_pcl" else {}
    offset = 3.0 if loss_type == "group_pcl" else 0.0

    def loss(logits, scale, shift, temperature):
        r = torch.where(last, scale * reward[:, None] + shift, torch.zeros(b, t))
        so = soft_outputs(logits, actions, temperature)
        return LOSSES[loss_type](so.q, so.v, r, mask, tau=temperature, ref_log_pi=ref, **kw)[0]

    def grad(*setting):
        logits = init.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(loss(logits, *setting), logits)
        return g

    plain = grad(1.0, 0.0, tau)
    assert plain.abs().max() > 1e-3
    torch.testing.assert_close(grad(a, offset, a * tau), a**2 * plain, rtol=1e-4, atol=1e-6)
    other = grad(1.0, 0.0, a * tau)  # the larger tau alone weighs the KL term more: another direction
    assert torch.nn.functional.cosine_similarity(other.flatten(), plain.flatten(), dim=0) < 0.99


def test_group_pcl_takes_float64_rewards(gen):
    """Rewards in float64 (a Python reward function's numbers, a float64 reward model) give the float32 loss;
    the per-path weights were float64 and could not be scattered into the float32 steps."""
    from sqlm.losses import group_pcl_loss

    logits = torch.randn(4, 3, 5, generator=gen)
    actions = torch.randint(0, 5, (4, 3), generator=gen)
    mask, rewards = torch.ones(4, 3), torch.rand(4, 3, generator=gen)
    so = soft_outputs(logits, actions, 0.5)
    group = torch.tensor([0, 0, 1, 1])
    for scale in ("none", "group"):
        want, _ = group_pcl_loss(so.q, so.v, rewards, mask, group=group, tau=0.5, scale=scale)
        got, _ = group_pcl_loss(so.q, so.v, rewards.double(), mask, group=group, tau=0.5, scale=scale)
        torch.testing.assert_close(got.float(), want)


def test_group_pcl_scale_weighs_each_path_by_its_groups_reward_deviation(gen):
    """By hand: ``scale="group"`` weighs path i's ``G_i^2 / 2`` by ``1 / (tau * s_g)``, ``s_g`` the unbiased
    standard deviation of the path rewards in its group; a group whose rewards are all equal takes the
    batch's deviation; "batch" takes the batch's for every path. The weights carry no gradient, so the
    gradient is ``-(G_i / s_g) grad log pi(y_i)`` (GRPO's advantage with ``R - tau log pi/pi_ref`` as R)."""
    from sqlm.losses import group_pcl_loss

    b, t, vocab, tau = 6, 3, 5, 0.2
    group = torch.tensor([0, 0, 0, 1, 1, 1])
    # a group's paths start in one state s_0: one row of start logits per group
    start = torch.randn(2, 1, vocab, generator=gen, requires_grad=True)
    rest = torch.randn(b, t - 1, vocab, generator=gen, requires_grad=True)
    logits = torch.cat([start[group], rest], 1)
    actions = torch.randint(0, vocab, (b, t), generator=gen)
    mask = torch.ones(b, t, dtype=torch.bool)
    rewards = torch.zeros(b, t)
    rewards[:, -1] = torch.tensor([1.0, 0.0, 0.0, 2.0, 2.0, 2.0])  # group 1: all equal
    ref = -torch.rand(b, t, generator=gen)
    so = soft_outputs(logits, actions, tau)
    x = ((rewards + tau * ref - tau * so.log_pi) * mask).sum(-1) - so.v[:, 0]
    g = torch.cat([x[:3] - x[:3].mean(), x[3:] - x[3:].mean()])
    r = rewards.sum(-1)
    s_group = torch.tensor([r[:3].std()] * 3 + [r.std()] * 3)
    for scale, s in (("group", s_group), ("batch", r.std().expand(b)), ("none", torch.full((b,), 1 / tau))):
        got, _ = group_pcl_loss(so.q, so.v, rewards, mask, group=group, tau=tau, ref_log_pi=ref, reduction="sequence",
                                scale=scale)  # fmt: skip
        torch.testing.assert_close(got.detach(), (0.5 * g.pow(2) / (tau * s)).sum().detach() / b)
    so = soft_outputs(logits, actions, tau)
    loss, _ = group_pcl_loss(so.q, so.v, rewards, mask, group=group, tau=tau, ref_log_pi=ref, reduction="sequence",
                             scale="group")  # fmt: skip
    grad = torch.autograd.grad(loss, (start, rest))
    advantage = (g / s_group).detach()
    log_pi = soft_outputs(torch.cat([start[group], rest], 1), actions, tau).log_pi
    want = torch.autograd.grad(-(advantage * log_pi.sum(-1)).sum() / b, (start, rest))
    torch.testing.assert_close(grad, want)
    with pytest.raises(ValueError, match="scale must be one of"):
        group_pcl_loss(so.q, so.v, rewards, mask, group=group, tau=tau, scale="rank")
