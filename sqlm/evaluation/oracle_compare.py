"""Exact-oracle comparison: ``KL(pi || pi*)`` against the number of preference pairs, sqlm vs DPO.

On a tiny token MDP (``sqlm.oracle``) with a known sequence reward ``R`` and reference ``pi_ref``
(a tiny LM), ``pi*(y) ~ pi_ref(y) exp(R(y) / tau)`` is exact. For each number of pairs ``n``:

1. ``2n`` paths are sampled from ``pi_ref`` and paired; each pair is labelled by Bradley-Terry with
   the true reward, ``P(y1 > y2) = sigmoid(R(y1) - R(y2))``.
2. **DPO** (Rafailov et al. 2023, eq. 7) trains a copy of ``pi_ref`` on the pairs:
   ``-log sigmoid(beta [log pi/pi_ref (y_c) - log pi/pi_ref (y_r)])`` with ``beta = tau``.
3. **sqlm**: a Bradley-Terry reward model (a tiny LM with a scalar head, score read after each
   token) is fitted on the same pairs; then unified PCL (seed Algorithm 2) trains a copy of
   ``pi_ref`` offline on the chosen and rejected paths with that reward: ``terminal`` (``R_hat`` on
   the last token) or ``prefix`` (``r_t = R_hat(y_<=t) - R_hat(y_<t)``, which telescopes to
   ``R_hat`` up to a constant).
4. ``KL(pi || pi*)`` of each trained policy is computed exactly by the oracle.

Everything is full-batch Adam with fixed seeds; the result is a table ``n -> KL`` per method.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass
class OracleCompareConfig:
    """Settings of the exact-oracle comparison."""

    pair_counts: list[int] = field(default_factory=lambda: [32, 128, 512])
    seeds: list[int] = field(default_factory=lambda: [0, 1])
    num_actions: int = 4  # EOS included
    horizon: int = 4
    reward_scale: float = 1.0
    tau: float = 1.0
    steps: int = 200
    lr: float = 1e-2
    rm_steps: int = 200
    rm_lr: float = 1e-2
    methods: list[str] = field(default_factory=lambda: ["dpo", "sqlm-terminal", "sqlm-prefix"])


def _models(seed: int):
    from ..tiny import tiny_causal_lm

    ref = tiny_causal_lm(8, seed=1000 + seed, hidden_size=32, num_hidden_layers=2)
    # a non-uniform reference: scale the output layer so pi_ref has some structure
    with torch.no_grad():
        ref.get_output_embeddings().weight.mul_(4.0)
    ref.eval()
    return ref


def _path_log_probs(model, mdp, tokens: torch.Tensor) -> torch.Tensor:
    """``sum_t log pi(a_t|s_t)`` of each path under a model (restricted to the MDP's actions)."""
    from ..oracle import restricted_logits

    _, cols, on = mdp.path_indices(tokens)
    logits = restricted_logits(model, mdp, tokens)
    lp = torch.log_softmax(logits.float(), -1).gather(-1, cols.clamp(min=0)[..., None]).squeeze(-1)
    return (lp * on).sum(-1)


def bt_pairs(mdp, n: int, generator: torch.Generator):
    """``n`` pairs of paths from ``pi_ref``, labelled by Bradley-Terry on the MDP's true reward:
    returns ``(chosen [n, H], rejected [n, H])``."""
    from ..oracle import sample_paths

    tokens, _ = sample_paths(mdp, mdp.behaviour_log_probs(), 2 * n, generator)
    r, _, _ = mdp.step_rewards(tokens)
    total = r.double().sum(-1)
    a, b = tokens[:n], tokens[n:]
    p = torch.sigmoid(total[:n] - total[n:])
    first = torch.rand(n, generator=generator, dtype=torch.float64) < p
    chosen = torch.where(first[:, None], a, b)
    rejected = torch.where(first[:, None], b, a)
    return chosen, rejected


def train_dpo(policy, mdp, chosen, rejected, *, beta: float, steps: int, lr: float) -> None:
    """Full-batch DPO (sigmoid loss) on the pairs."""
    from ..oracle import sequence_log_prob

    ref_c = sequence_log_prob(mdp, mdp.ref_log_pi, chosen).float()
    ref_r = sequence_log_prob(mdp, mdp.ref_log_pi, rejected).float()
    opt = torch.optim.Adam(policy.parameters(), lr=lr)
    for _ in range(steps):
        margin = (_path_log_probs(policy, mdp, chosen) - ref_c) - (_path_log_probs(policy, mdp, rejected) - ref_r)
        loss = -F.logsigmoid(beta * margin).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


class _Scorer(torch.nn.Module):
    """A tiny LM body with a scalar head: ``score(s)`` for every state along a path."""

    def __init__(self, seed: int):
        super().__init__()
        from ..tiny import tiny_causal_lm

        self.body = tiny_causal_lm(8, seed=2000 + seed, hidden_size=32, num_hidden_layers=2)
        self.head = torch.nn.Linear(32, 1)

    def state_scores(self, mdp, tokens: torch.Tensor) -> torch.Tensor:
        """Scores of ``s_0 .. s_L`` for paths ``tokens [n, L]``: ``[n, L + 1]``."""
        from ..oracle import restricted_logits

        ext = torch.cat([tokens, torch.full((tokens.shape[0], 1), mdp.eos, dtype=torch.long)], dim=1)
        _, hidden = restricted_logits(self.body, mdp, ext, output_hidden_states=True)
        return self.head(hidden.float()).squeeze(-1)

    def sequence_scores(self, mdp, tokens: torch.Tensor) -> torch.Tensor:
        _, _, on = mdp.path_indices(tokens)
        last = on.sum(-1).long()  # s_T, the state after the last action
        return self.state_scores(mdp, tokens).gather(1, last[:, None]).squeeze(1)


def train_reward_model(mdp, chosen, rejected, *, seed: int, steps: int, lr: float) -> _Scorer:
    """Bradley-Terry reward model ``-log sigmoid(R_hat(y_c) - R_hat(y_r))``, full batch."""
    torch.manual_seed(seed)
    rm = _Scorer(seed)
    opt = torch.optim.Adam(rm.parameters(), lr=lr)
    for _ in range(steps):
        loss = -F.logsigmoid(rm.sequence_scores(mdp, chosen) - rm.sequence_scores(mdp, rejected)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    rm.eval()
    return rm


@torch.no_grad()
def dense_rewards(rm: _Scorer, mdp, tokens: torch.Tensor, kind: str) -> torch.Tensor:
    """``terminal``: ``R_hat`` on the last step; ``prefix``: ``score(s_{t+1}) - score(s_t)``."""
    from ..rewards.base import terminal_rewards

    _, _, on = mdp.path_indices(tokens)
    s = rm.state_scores(mdp, tokens)
    if kind == "terminal":
        return terminal_rewards(rm.sequence_scores(mdp, tokens), on)
    if kind == "prefix":
        return (s[:, 1:] - s[:, :-1]) * on
    raise ValueError(f"unknown dense reward kind {kind!r}")


def train_sqlm(policy, mdp, tokens, rewards, *, tau: float, steps: int, lr: float) -> None:
    """Full-batch offline unified PCL (seed Algorithm 2, d = whole path) on fixed paths and rewards."""
    from ..losses import unified_pcl_loss
    from ..oracle import restricted_logits
    from ..soft import soft_outputs

    _, ref, on = mdp.step_rewards(tokens)
    _, cols, _ = mdp.path_indices(tokens)
    opt = torch.optim.Adam(policy.parameters(), lr=lr)
    for _ in range(steps):
        so = soft_outputs(restricted_logits(policy, mdp, tokens), cols.clamp(min=0), tau)
        loss, _ = unified_pcl_loss(so.q, so.v, rewards, on, tau=tau, ref_log_pi=ref)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def run_oracle_comparison(cfg: OracleCompareConfig | None = None, progress: bool = True) -> dict:
    """``{"rows": [{method, pairs, seed, kl}], "summary": {method: {pairs: mean KL}}, "kl_ref": ...}``."""
    from tqdm.auto import tqdm

    from ..oracle import random_mdp, solve

    cfg = cfg or OracleCompareConfig()
    rows = []
    kl_ref = []
    total = len(cfg.seeds) * len(cfg.pair_counts)
    bar = tqdm(total=total, desc="oracle comparison", disable=not progress, leave=False)
    for seed in cfg.seeds:
        ref = _models(seed)
        mdp = random_mdp(
            num_actions=cfg.num_actions, horizon=cfg.horizon, reward="terminal", scale=cfg.reward_scale,
            tau=cfg.tau, ref_model=ref, prompt=(7,), seed=seed,
        )  # fmt: skip
        sol = solve(mdp)
        kl_ref.append(sol.kl(mdp.ref_log_pi))
        for n in cfg.pair_counts:
            gen = torch.Generator().manual_seed(10_000 * seed + n)
            chosen, rejected = bt_pairs(mdp, n, gen)
            rm = None
            for method in cfg.methods:
                torch.manual_seed(seed)
                policy = copy.deepcopy(ref).train()
                if method == "dpo":
                    train_dpo(policy, mdp, chosen, rejected, beta=cfg.tau, steps=cfg.steps, lr=cfg.lr)
                elif method.startswith("sqlm-"):
                    if rm is None:
                        rm = train_reward_model(mdp, chosen, rejected, seed=seed, steps=cfg.rm_steps, lr=cfg.rm_lr)
                    tokens = torch.cat([chosen, rejected])
                    rewards = dense_rewards(rm, mdp, tokens, method.split("-", 1)[1])
                    train_sqlm(policy, mdp, tokens, rewards, tau=cfg.tau, steps=cfg.steps, lr=cfg.lr)
                else:
                    raise ValueError(f"unknown method {method!r}")
                policy.eval()
                rows.append({"method": method, "pairs": n, "seed": seed, "kl": sol.kl(policy)})
            bar.update(1)
    bar.close()
    summary: dict[str, dict[int, float]] = {}
    for m in cfg.methods:
        summary[m] = {}
        for n in cfg.pair_counts:
            vals = [r["kl"] for r in rows if r["method"] == m and r["pairs"] == n]
            summary[m][n] = sum(vals) / len(vals)
    return {"rows": rows, "summary": summary, "kl_ref": sum(kl_ref) / len(kl_ref), "settings": cfg.__dict__}


def oracle_section(result: dict) -> str:
    """Markdown: the KL-vs-pairs table of :func:`run_oracle_comparison`."""
    s = result["settings"]
    counts = s["pair_counts"]
    lines = [
        "## Exact oracle: KL(π ‖ π*) against the number of preference pairs",
        "",
        f"Random token MDPs ({s['num_actions']} actions with EOS, horizon {s['horizon']}, sequence reward "
        f"N(0, {s['reward_scale']}²)), π_ref a tiny LM, τ = β = {s['tau']}; pairs sampled from π_ref and "
        "labelled by Bradley–Terry on the true reward; exact KL by `sqlm.oracle`, mean over seeds "
        f"{s['seeds']}. KL(π_ref ‖ π*) = {result['kl_ref']:.4f} (where every method starts).",
        "",
        "| method | " + " | ".join(f"{n} pairs" for n in counts) + " |",
        "|---|" + "---|" * len(counts),
    ]
    for m, by_n in result["summary"].items():
        lines.append(f"| {m} | " + " | ".join(f"{by_n.get(n, by_n.get(str(n))):.4f}" for n in counts) + " |")
    return "\n".join(lines)
