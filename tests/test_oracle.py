"""sqlm.oracle: the exact soft-optimal solution against independent computations, the seed's
path-consistency identities (Theorem 1, Corollary 2, Theorem 3), exact KL, sampling, the CLI."""

import math

import pytest
import torch

from sqlm.commands.oracle import main
from sqlm.losses import path_consistency
from sqlm.oracle import (
    TokenMDP,
    enumerate_sequences,
    policy_log_probs,
    random_mdp,
    sample_paths,
    sequence_kl,
    sequence_log_prob,
    solve,
)
from sqlm.tiny import tiny_causal_lm


ACTIONS, EOS, PROMPT = (0, 1, 2, 3), 3, (7,)


@pytest.fixture(scope="module")
def ref_lm():
    lm = tiny_causal_lm(8, seed=11, hidden_size=16, num_hidden_layers=1)
    with torch.no_grad():
        lm.model.norm.weight.fill_(5.0)  # a reference clearly away from uniform
    return lm


def token_r(prefix, a):
    return math.sin(3 * len(prefix) + 7 * a + sum(prefix)) + 0.3 * (a == EOS)


def seq_r(y):
    return math.cos(sum((i + 1) * t for i, t in enumerate(y))) * 2


def ref_log_probs_direct(lm, prompt, prefix):
    """log pi_ref(.|prompt+prefix) on the action subset, by one direct forward."""
    with torch.no_grad():
        logits = lm(input_ids=torch.tensor([list(prompt) + list(prefix)])).logits[0, -1]
    return torch.log_softmax(logits[list(ACTIONS)].double(), -1)


def naive_solution(horizon, tau, gamma, reward, kind, ref=None):
    """V*(prefix) and log pi*(.|prefix) by plain recursion over tuples (no batching)."""
    v, lp = {}, {}

    def value(prefix):
        if prefix in v:
            return v[prefix]
        ref_lp = ref_log_probs_direct(ref, PROMPT, prefix) if ref is not None else torch.zeros(4, dtype=torch.float64)
        qs = []
        for c, a in enumerate(ACTIONS):
            ended = a == EOS or len(prefix) + 1 == horizon
            if kind == "token":
                r = reward(prefix, a)
            else:
                r = reward(prefix + (a,)) if ended else 0.0
            r = r + tau * float(ref_lp[c])
            qs.append(r + (0.0 if ended else gamma * value(prefix + (a,))))
        q = torch.tensor(qs, dtype=torch.float64)
        v[prefix] = tau * float(torch.logsumexp(q / tau, 0))
        lp[prefix] = (q - v[prefix]) / tau
        return v[prefix]

    value(())
    return v, lp


def make(kind, horizon=3, tau=0.7, gamma=1.0, ref=None):
    rw = {"token_reward": token_r} if kind == "token" else {"sequence_reward": seq_r}
    return TokenMDP(ACTIONS, EOS, horizon, prompt=PROMPT, tau=tau, gamma=gamma, ref_model=ref, **rw)


# ----------------------------------------------------------------------------- the solution


@pytest.mark.parametrize("kind", ["token", "sequence"])
@pytest.mark.parametrize("gamma", [1.0, 0.8])
@pytest.mark.parametrize("with_ref", [False, True])
def test_solution_equals_naive_recursion(ref_lm, kind, gamma, with_ref):
    ref = ref_lm if with_ref else None
    mdp = make(kind, horizon=3, gamma=gamma, ref=ref)
    sol = solve(mdp)
    v, lp = naive_solution(3, 0.7, gamma, token_r if kind == "token" else seq_r, kind, ref)
    assert len(v) == mdp.num_states == 1 + 3 + 9
    for d in range(3):
        for i, prefix in enumerate(map(tuple, mdp.prefixes[d].tolist())):
            # (the reference LM runs in fp32: batched and single forwards differ by ~1e-8)
            assert sol.v[d][i].item() == pytest.approx(v[prefix], abs=1e-6)
            torch.testing.assert_close(sol.log_pi[d][i], lp[prefix], atol=1e-6, rtol=0)
            # Q* = r~ + gamma V*(s.a), V* = tau logsumexp Q*/tau, pi* sums to 1
            assert sol.log_pi[d][i].exp().sum().item() == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("with_ref", [False, True])
def test_gamma_one_sequence_reward_closed_form(ref_lm, with_ref):
    """pi*(y) ∝ pi_ref(y) exp(R(y)/tau) and V*(s0) = tau log sum_y pi_ref(y) exp(R(y)/tau)."""
    ref = ref_lm if with_ref else None
    mdp = make("sequence", horizon=4, tau=0.5, ref=ref)
    sol = solve(mdp)
    table = sol.sequences()
    assert len(table.lengths) == mdp.num_sequences == (1 + 3 + 9 + 27) + 81
    base = mdp.ref_log_pi if with_ref else [torch.zeros_like(t) for t in mdp.uniform_log_probs()]
    log_ref = enumerate_sequences(mdp, base).log_prob
    logits = log_ref + table.reward / 0.5
    torch.testing.assert_close(table.log_prob, logits - torch.logsumexp(logits, 0), atol=1e-10, rtol=0)
    assert sol.v0 == pytest.approx(0.5 * torch.logsumexp(logits, 0).item(), abs=1e-10)
    # the total reward is the sequence reward, and each listed sequence is unique
    items = table.as_list()
    assert len({y for y, _, _ in items}) == len(items)
    for y, _, r in items[::7]:
        assert r == pytest.approx(seq_r(y))
    assert sum(p for _, p, _ in items) == pytest.approx(1.0)


def test_reward_forms_agree():
    """Plain callables, batched callables and per-depth tensors give one solution."""
    plain = make("token", horizon=3)

    def batched(prefixes, actions):
        return torch.tensor([[token_r(tuple(p), a) for a in actions.tolist()] for p in prefixes.tolist()])

    b = TokenMDP(ACTIONS, EOS, 3, prompt=PROMPT, tau=0.7, token_reward=batched, batched=True)
    t = TokenMDP(ACTIONS, EOS, 3, prompt=PROMPT, tau=0.7, token_reward=[r.clone() for r in plain.rewards])
    for other in (b, t):
        for x, y in zip(solve(plain).log_pi, solve(other).log_pi):
            torch.testing.assert_close(x, y)
    seq = make("sequence", horizon=3)
    sb = TokenMDP(
        ACTIONS,
        EOS,
        3,
        prompt=PROMPT,
        tau=0.7,
        batched=True,
        sequence_reward=lambda ys: torch.tensor([seq_r(tuple(y)) for y in ys.tolist()]),
    )
    for x, y in zip(seq.rewards, sb.rewards):
        torch.testing.assert_close(x, y)


def test_vocab_8_horizon_5_with_reference():
    ref = tiny_causal_lm(8, seed=3, hidden_size=16, num_hidden_layers=1)
    mdp = random_mdp(num_actions=8, horizon=5, ref_model=ref, prompt=(7,), seed=2)
    sol = solve(mdp)
    assert mdp.num_states == 1 + 7 + 49 + 343 + 2401
    assert mdp.num_sequences == 2801 + 7**5
    table = sol.sequences()
    assert table.log_prob.exp().sum().item() == pytest.approx(1.0, abs=1e-9)
    assert torch.isfinite(torch.stack([v.sum() for v in sol.v])).all()
    model = tiny_causal_lm(8, seed=4, hidden_size=16, num_hidden_layers=1)
    assert sol.kl(model) > 0


# ----------------------------------------------------------------------------- seed identities


def oracle_paths(sol, n, gen):
    """n random paths (uniform behaviour: any provenance) with their per-step oracle quantities."""
    mdp = sol.mdp
    tokens, mask = sample_paths(mdp, mdp.uniform_log_probs(), n, gen)
    rows, cols, on = mdp.path_indices(tokens)
    torch.testing.assert_close(on, mask)
    r, ref, _ = mdp.step_rewards(tokens)
    x = dict(
        values=sol.path_values(tokens),
        log_pi=mdp.gather(sol.log_pi, rows, cols),
        rewards=r.double(),
        ref_log_pi=None if ref is None else mdp.gather(mdp.ref_log_pi, rows, cols),
        mask=mask,
    )
    return x, rows, cols


@pytest.mark.parametrize("kind", ["token", "sequence"])
@pytest.mark.parametrize("gamma", [1.0, 0.85])
@pytest.mark.parametrize("with_ref", [False, True])
def test_consistency_of_the_optimum_is_zero(ref_lm, gen, kind, gamma, with_ref):
    """Theorem 1 (d=1) and Corollary 2 (every d): C(i, d) = 0 for pi*, V* on any path."""
    mdp = make(kind, horizon=4, tau=0.6, gamma=gamma, ref=ref_lm if with_ref else None)
    sol = solve(mdp)
    x, _, _ = oracle_paths(sol, 64, gen)
    assert x["mask"].sum(-1).min() >= 1 and x["mask"].sum(-1).max() == 4
    for d in (1, 2, 3, 4, 10, None):
        c = path_consistency(
            x["values"], x["log_pi"], x["rewards"], x["mask"], tau=0.6, gamma=gamma, d=d, ref_log_pi=x["ref_log_pi"]
        )
        assert c.abs().max().item() < 1e-4, d


@pytest.mark.parametrize("gamma", [1.0, 0.85])
def test_consistency_is_clearly_nonzero_off_the_optimum(ref_lm, gen, gamma):
    """Theorem 3: perturbing pi (renormalised) or V breaks the consistency somewhere."""
    mdp = make("token", horizon=4, tau=0.6, gamma=gamma, ref=ref_lm)
    sol = solve(mdp)
    x, rows, cols = oracle_paths(sol, 64, gen)
    noisy = [
        torch.log_softmax(lp + 0.5 * torch.randn(lp.shape, generator=gen, dtype=lp.dtype), -1) for lp in sol.log_pi
    ]
    bad_pi = mdp.gather(noisy, rows, cols)
    bad_v = x["values"] + 0.3 * x["mask"]
    for d in (1, 2, None):
        kw = dict(tau=0.6, gamma=gamma, d=d, ref_log_pi=x["ref_log_pi"])
        c = path_consistency(x["values"], bad_pi, x["rewards"], x["mask"], **kw)
        assert c.abs().max().item() > 0.1
        c = path_consistency(bad_v, x["log_pi"], x["rewards"], x["mask"], **kw)
        assert c.abs().max().item() > 0.1


# ----------------------------------------------------------------------------- KL, sampling, log-probs


def brute_force_kl(model, sol):
    """sum_y p(y) [log p(y) - log pi*(y)], with log p(y) from one forward of each whole sequence."""
    mdp = sol.mdp
    table = sol.sequences()
    total = 0.0
    for toks, n, lstar in zip(table.tokens.tolist(), table.lengths.tolist(), table.log_prob.tolist()):
        ids = torch.tensor([list(mdp.prompt) + toks[:n]])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, len(mdp.prompt) - 1 : len(mdp.prompt) - 1 + n]
        lp = torch.log_softmax(logits[:, list(mdp.actions)].double(), -1)
        cols = [mdp.actions.index(t) for t in toks[:n]]
        logp = float(lp[torch.arange(n), cols].sum())
        total += math.exp(logp) * (logp - lstar)
    return total


def test_exact_kl_equals_brute_force(ref_lm):
    sol = solve(make("token", horizon=3, gamma=0.9, ref=ref_lm))
    model = tiny_causal_lm(8, seed=21, hidden_size=16, num_hidden_layers=1)
    with torch.no_grad():
        model.model.norm.weight.fill_(4.0)
    kl = sol.kl(model)
    assert kl == pytest.approx(brute_force_kl(model, sol), abs=1e-9)
    assert kl > 0.05
    assert sol.kl(sol.log_pi) == pytest.approx(0.0, abs=1e-12)
    # KL between two tables equals the sequence-level sum over enumerated sequences
    p = policy_log_probs(model, sol.mdp)
    lp_p = enumerate_sequences(sol.mdp, p).log_prob
    lp_q = sol.sequences().log_prob
    assert float(sequence_kl(sol.mdp, p, sol.log_pi)) == pytest.approx(
        float((lp_p.exp() * (lp_p - lp_q)).sum()), abs=1e-10
    )
    # differentiable in the model's parameters
    p = policy_log_probs(model, sol.mdp, grad=True)
    sequence_kl(sol.mdp, p, sol.log_pi).backward()
    assert model.model.embed_tokens.weight.grad.abs().sum() > 0


def test_sampling_matches_probabilities(ref_lm):
    sol = solve(make("sequence", horizon=3, ref=ref_lm))
    gen = torch.Generator().manual_seed(0)
    n = 20000
    for tables in (sol.log_pi, sol.mdp.ref_log_pi):
        tokens, mask = sample_paths(sol.mdp, tables, n, gen)
        table = enumerate_sequences(sol.mdp, tables)
        lengths = mask.sum(-1).long()
        counts = {}
        for toks, m in zip(tokens.tolist(), lengths.tolist()):
            counts[tuple(toks[:m])] = counts.get(tuple(toks[:m]), 0) + 1
        probs = {y: p for y, p, _ in table.as_list()}
        assert set(counts) <= set(probs)
        worst = max(abs(counts.get(y, 0) / n - p) for y, p in probs.items())
        assert worst < 0.012
        # after the end: EOS padding; log-probs of samples agree with the enumerated ones
        lp = sequence_log_prob(sol.mdp, tables, tokens[:50])
        for toks, m, got in zip(tokens[:50].tolist(), lengths[:50].tolist(), lp.tolist()):
            assert got == pytest.approx(math.log(probs[tuple(toks[:m])]), abs=1e-9)
    torch.testing.assert_close(sol.log_prob(tokens[:50]), sequence_log_prob(sol.mdp, sol.log_pi, tokens[:50]))


def test_path_indices_ignore_what_follows_the_end():
    mdp = make("token", horizon=4)
    tokens = torch.tensor([[0, EOS, 99, -5], [1, 2, 0, 1], [2, 2, EOS, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 1]])
    rows, cols, on = mdp.path_indices(tokens, mask)
    torch.testing.assert_close(on, torch.tensor([[1.0, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0]]))
    assert rows[2].tolist() == [0, 2, 2 * 3 + 2, -1]
    assert cols[0].tolist() == [0, 3, -1, -1]
    r, ref, _ = mdp.step_rewards(tokens, mask)
    assert ref is None
    assert r[2, 2].item() == pytest.approx(token_r((2, 2), EOS), abs=1e-6)
    assert r[0, 2:].abs().sum() == 0


# ----------------------------------------------------------------------------- bad input


def test_bad_input_names_the_argument():
    ok = dict(prompt=PROMPT, token_reward=token_r)
    with pytest.raises(ValueError, match="eos_token_id"):
        TokenMDP((0, 1, 2), 3, 3, **ok)
    with pytest.raises(ValueError, match="horizon"):
        TokenMDP(ACTIONS, EOS, 0, **ok)
    with pytest.raises(ValueError, match="actions"):
        TokenMDP((1, 1, 3), 3, 2, **ok)
    with pytest.raises(ValueError, match="tau"):
        TokenMDP(ACTIONS, EOS, 2, tau=0, **ok)
    with pytest.raises(ValueError, match="gamma"):
        TokenMDP(ACTIONS, EOS, 2, gamma=1.5, **ok)
    with pytest.raises(ValueError, match="token_reward and sequence_reward"):
        TokenMDP(ACTIONS, EOS, 2, prompt=PROMPT, token_reward=token_r, sequence_reward=seq_r)
    with pytest.raises(ValueError, match=r"token_reward\[1\]"):
        TokenMDP(ACTIONS, EOS, 2, token_reward=[torch.zeros(1, 4), torch.zeros(2, 4)])
    with pytest.raises(ValueError, match="not finite"):
        TokenMDP(ACTIONS, EOS, 2, token_reward=lambda p, a: float("nan"))
    mdp = make("token", horizon=3)
    with pytest.raises(ValueError, match=r"tokens\[0, 1\] = 5"):
        mdp.path_indices(torch.tensor([[0, 5, 1]]))
    with pytest.raises(ValueError, match="tokens"):
        mdp.path_indices(torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="prompt"):
        policy_log_probs(
            tiny_causal_lm(8, seed=0, hidden_size=16, num_hidden_layers=1),
            TokenMDP(ACTIONS, EOS, 2, token_reward=token_r),
        )


def test_train_towards_oracle_rejects_unknown_loss():
    from sqlm.evaluation.oracle_train import train_towards_oracle

    sol = solve(make("token", horizon=2))
    with pytest.raises(ValueError, match="loss_type"):
        train_towards_oracle(tiny_causal_lm(8, seed=0, hidden_size=16, num_hidden_layers=1), sol, "dpo")


# ----------------------------------------------------------------------------- the command


def test_cli_help_and_short_run(capsys):
    assert main(["--help"]) == 0
    assert "KL" in capsys.readouterr().out
    rc = main(["--steps", "4", "--eval-every", "2", "--horizon", "2", "--actions", "3", "--batch-size", "8"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "V*(s0)" in out
    rows = [line.split() for line in out.splitlines() if line.strip() and line.split()[0].isdigit()]
    assert [int(r[0]) for r in rows] == [0, 2, 4]
    assert all(float(r[1]) >= 0 for r in rows)


def test_cli_bad_arguments_exit_2(capsys):
    from sqlm.cli import main as sqlm_main

    assert sqlm_main(["oracle", "--horizon", "9"]) == 2
    assert "--horizon" in capsys.readouterr().err
    assert sqlm_main(["oracle", "--loss", "nope"]) == 2


def test_cli_takes_underscore_and_dashed_flags():
    from sqlm.commands.oracle import _parser

    for argv in (
        ["--batch_size", "8", "--eval_every", "3", "--off_policy", "--no_reference", "--max_steps", "5"],
        ["--batch-size", "8", "--eval-every", "3", "--off-policy", "--no-reference", "--steps", "5"],
    ):
        args = _parser().parse_args(argv)
        assert (args.batch_size, args.eval_every, args.off_policy, args.no_reference, args.steps) == (
            8,
            3,
            True,
            True,
            5,
        )
