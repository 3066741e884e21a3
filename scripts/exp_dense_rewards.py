"""Do dense per-token rewards from a learned reward model help? Measured against the exact optimum.

Setup (all tiny, CPU, exact):

1. A token MDP (``sqlm.oracle.TokenMDP``): prompt ``<bos>``, actions ``0..K-1`` plus EOS, horizon
   ``H``, reference ``pi_ref`` = a tiny random LM, temperature ``tau``. A KNOWN per-token reward
   ``r*(s_t, a) = W[t, a]`` (seeded normal). The target is the exact soft optimum of ``r*``:
   ``pi*(y) ∝ pi_ref(y) exp(R*(y)/tau)``, solved by ``sqlm.oracle.solve``.
2. Preference pairs: two completions sampled from ``pi_ref``, labelled by Bradley–Terry on the
   known reward, ``P(y1 ≻ y2) = σ(R*(y1) − R*(y2))``.
3. A tiny causal reward model (``Qwen2ForSequenceClassification``) trained on the pairs with the
   Bradley–Terry loss, and a DPO model (``β = tau``) trained on the same pairs, for ``implicit``.
4. For each rewarder, a policy (initialised at ``pi_ref``) is trained on-policy with unified PCL
   (``sqlm.losses.unified_pcl_loss``) on that rewarder's dense rewards; the exact
   ``KL(pi_theta || pi*)`` is recorded every few steps.

Rewarders: the learned ones (``terminal`` — the baseline —, ``uniform``, ``abc``, ``prefix``,
``implicit``) and two references that use the true reward instead of a learned model:
``gold-terminal`` (``R*`` on the last token) and ``gold-dense`` (``r*`` itself). Dense rewards of
every complete sequence are computed once (there are few) and looked up per sampled path, as the
reward cache does for offline data.

    python scripts/exp_dense_rewards.py                 # ~3 minutes on 2 CPU cores
    python scripts/exp_dense_rewards.py --seeds 1 --steps 100    # quick look
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time


os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from sqlm.losses import unified_pcl_loss
from sqlm.oracle import (
    TokenMDP,
    enumerate_sequences,
    policy_log_probs,
    restricted_logits,
    sample_paths,
    sequence_kl,
    solve,
)
from sqlm.rewards import build_rewarder
from sqlm.rewards.cache import make_batch
from sqlm.soft import soft_outputs
from sqlm.tiny import tiny_causal_lm, tiny_qwen2_config


VOCAB, BOS, PAD = 8, 7, 6
LEARNED = ["terminal", "uniform", "abc", "prefix", "implicit"]
GOLD = ["gold-terminal", "gold-dense"]


# ----------------------------------------------------------------------------- the task


def make_task(args, seed: int):
    g = torch.Generator().manual_seed(1000 + seed)
    num_actions = args.actions
    eos = num_actions - 1
    w = args.reward_scale * torch.randn(args.horizon, num_actions, generator=g, dtype=torch.float64)
    ref = tiny_causal_lm(VOCAB, seed=seed + 1, hidden_size=16, num_hidden_layers=1).eval()
    mdp = TokenMDP(
        list(range(num_actions)),
        eos,
        args.horizon,
        prompt=(BOS,),
        tau=args.tau,
        token_reward=lambda prefix, a: float(w[len(prefix), a]),
        ref_model=ref,
    )
    return mdp, ref


def preference_pairs(mdp, n: int, seed: int):
    """Pairs from pi_ref labelled by Bradley–Terry on the known reward: (chosen, rejected) paths."""
    g = torch.Generator().manual_seed(2000 + seed)
    a, am = sample_paths(mdp, mdp.ref_log_pi, n, g)
    b, bm = sample_paths(mdp, mdp.ref_log_pi, n, g)
    ra = (mdp.step_rewards(a, am)[0] * am).sum(1)
    rb = (mdp.step_rewards(b, bm)[0] * bm).sum(1)
    a_wins = torch.rand(n, generator=g) < torch.sigmoid(ra - rb)
    chosen = torch.where(a_wins[:, None], a, b), torch.where(a_wins[:, None], am, bm)
    rejected = torch.where(a_wins[:, None], b, a), torch.where(a_wins[:, None], bm, am)
    return chosen, rejected


def with_prompt(tokens, mask):
    """``<bos> + path`` as model input, right-padded (pad off the path)."""
    n = tokens.shape[0]
    ids = torch.cat([torch.full((n, 1), BOS), torch.where(mask.bool(), tokens, PAD)], 1)
    att = torch.cat([torch.ones(n, 1), mask], 1).long()
    return ids, att


# ----------------------------------------------------------------------------- reward model and DPO


def train_reward_model(chosen, rejected, args, seed: int):
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)
    config = tiny_qwen2_config(VOCAB, hidden_size=32, num_hidden_layers=2, pad_token_id=PAD)
    config.num_labels = 1
    rm = AutoModelForSequenceClassification.from_config(config)
    opt = torch.optim.Adam(rm.parameters(), lr=args.rm_lr)
    g = torch.Generator().manual_seed(seed)
    n = chosen[0].shape[0]
    n_train = int(0.9 * n)

    def scores(tokens, mask):
        ids, att = with_prompt(tokens, mask)
        pos = (att.cumsum(1) - 1).clamp(min=0)
        h = rm.model(input_ids=ids, attention_mask=att, position_ids=pos, use_cache=False).last_hidden_state
        s = rm.score(h).squeeze(-1)
        return s[torch.arange(ids.shape[0]), att.sum(1) - 1]  # the last real token

    rm.train()
    for _ in range(args.rm_steps):
        idx = torch.randint(0, n_train, (args.batch_size,), generator=g)
        margin = scores(chosen[0][idx], chosen[1][idx]) - scores(rejected[0][idx], rejected[1][idx])
        loss = -torch.nn.functional.logsigmoid(margin).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    rm.eval()
    with torch.no_grad():
        held = slice(n_train, n)
        acc = (scores(chosen[0][held], chosen[1][held]) > scores(rejected[0][held], rejected[1][held])).float().mean()
    return rm, float(acc)


def gold_accuracy(mdp, chosen, rejected) -> float:
    """Held-out accuracy of the true reward itself: the ceiling under noisy Bradley–Terry labels."""
    n = chosen[0].shape[0]
    held = slice(int(0.9 * n), n)
    rc = (mdp.step_rewards(chosen[0][held], chosen[1][held])[0] * chosen[1][held]).sum(1)
    rr = (mdp.step_rewards(rejected[0][held], rejected[1][held])[0] * rejected[1][held]).sum(1)
    return float((rc > rr).float().mean())


def reward_model_floor(mdp, sol, rm, ref, args) -> float:
    """``KL(pi*_RM || pi*)``, ``pi*_RM ∝ pi_ref exp(R_RM / tau)``: the best a policy can do with ANY
    rewarder whose rewards sum to the reward model's score (terminal, uniform, abc; prefix up to
    a constant)."""
    scorer = build_rewarder("terminal", reward_model=rm)

    def seq_reward(seqs):
        completions = [list(row) for row in seqs.tolist()]
        return scorer.sequence_rewards(make_batch([[BOS]] * len(completions), completions, PAD)).double()

    mdp_rm = TokenMDP(
        list(mdp.actions),
        mdp.eos,
        mdp.horizon,
        prompt=mdp.prompt,
        tau=mdp.tau,
        sequence_reward=seq_reward,
        batched=True,
        ref_model=ref,
    )
    return float(sequence_kl(mdp, solve(mdp_rm).log_pi, sol.log_pi))


def train_dpo(ref, chosen, rejected, args, seed: int):
    """DPO (beta = tau) from pi_ref on the same pairs; full-vocabulary log-probs, as ImplicitRewarder."""
    model = copy.deepcopy(ref).train()
    opt = torch.optim.Adam(model.parameters(), lr=args.dpo_lr)
    g = torch.Generator().manual_seed(3000 + seed)
    n = chosen[0].shape[0]

    def logp(m, tokens, mask):
        ids, att = with_prompt(tokens, mask)
        lp = torch.log_softmax(m(input_ids=ids, attention_mask=att).logits[:, :-1].float(), -1)
        return (lp.gather(-1, ids[:, 1:, None]).squeeze(-1) * mask).sum(1)

    for _ in range(args.dpo_steps):
        idx = torch.randint(0, n, (args.batch_size,), generator=g)
        c, r = (chosen[0][idx], chosen[1][idx]), (rejected[0][idx], rejected[1][idx])
        with torch.no_grad():
            ref_margin = logp(ref, *c) - logp(ref, *r)
        margin = logp(model, *c) - logp(model, *r) - ref_margin
        loss = -torch.nn.functional.logsigmoid(args.tau * margin).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


# ----------------------------------------------------------------------------- dense reward tables


def reward_lookup(mdp, rewarder_name: str, rm, dpo, ref, args):
    """Dense rewards of every complete sequence, ``{path tuple: tensor[len]}``."""
    seqs = enumerate_sequences(mdp)
    tokens, lengths = seqs.tokens, seqs.lengths
    mask = (torch.arange(mdp.horizon)[None] < lengths[:, None]).float()
    if rewarder_name == "gold-dense":
        r = mdp.step_rewards(tokens, mask)[0]
    elif rewarder_name == "gold-terminal":
        total = (mdp.step_rewards(tokens, mask)[0] * mask).sum(1)
        r = torch.zeros_like(mask)
        r[torch.arange(len(lengths)), lengths - 1] = total
    else:
        if rewarder_name == "implicit":
            rewarder = build_rewarder("implicit", model=dpo, ref_model=ref, beta=args.tau)
        else:
            kwargs = {"beta": args.abc_beta} if rewarder_name == "abc" else {}
            rewarder = build_rewarder(rewarder_name, reward_model=rm, **kwargs)
        completions = [row[: int(n)].tolist() for row, n in zip(tokens, lengths)]
        batch = make_batch([[BOS]] * len(completions), completions, PAD)
        r = rewarder(batch)
    return {tuple(row[: int(n)].tolist()): r[i, : int(n)].float() for i, (row, n) in enumerate(zip(tokens, lengths))}


def lookup(table, tokens, mask):
    out = torch.zeros(mask.shape)
    for i, (row, n) in enumerate(zip(tokens.tolist(), mask.sum(1).long().tolist())):
        out[i, :n] = table[tuple(row[:n])]
    return out


# ----------------------------------------------------------------------------- unified PCL


def train_policy(ref, mdp, sol, table, args, seed: int):
    """Unified PCL on-policy from pi_ref with the looked-up dense rewards; returns the KL curve."""
    model = copy.deepcopy(ref).train()
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    final = args.lr / 10
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: 1 + (final / args.lr - 1) * min(i / max(args.steps - 1, 1), 1)
    )
    g = torch.Generator().manual_seed(4000 + seed)
    curve = []
    for step in range(args.steps + 1):
        tables = policy_log_probs(model, mdp)
        if step % args.eval_every == 0 or step == args.steps:
            curve.append((step, float(sequence_kl(mdp, tables, sol.log_pi))))
        if step == args.steps:
            break
        tokens, _ = sample_paths(mdp, tables, args.batch_size, g)
        _, ref_lp, mask = mdp.step_rewards(tokens)
        rewards = lookup(table, tokens, mask)
        _, cols, _ = mdp.path_indices(tokens)
        so = soft_outputs(restricted_logits(model, mdp, tokens), cols, mdp.tau)
        loss, _ = unified_pcl_loss(so.q, so.v, rewards, mask, tau=mdp.tau, d=args.d, ref_log_pi=ref_lp)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return curve


# ----------------------------------------------------------------------------- main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=4, help="independent tasks (reward, pairs, models)")
    p.add_argument("--actions", type=int, default=5, help="action subset size, EOS included")
    p.add_argument("--horizon", type=int, default=4)
    p.add_argument("--tau", type=float, default=1.0, help="temperature (= DPO's beta)")
    p.add_argument("--reward-scale", type=float, default=1.0, help="std of the known per-token reward")
    p.add_argument("--pairs", type=int, default=2000, help="preference pairs")
    p.add_argument("--rm-steps", type=int, default=300)
    p.add_argument("--rm-lr", type=float, default=3e-3)
    p.add_argument("--dpo-steps", type=int, default=200)
    p.add_argument("--dpo-lr", type=float, default=3e-3)
    p.add_argument("--abc-beta", type=float, default=0.8)
    p.add_argument("--steps", type=int, default=300, help="unified PCL steps per rewarder")
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--d", type=int, default=1, help="PCL rollout length (0: to the end of the path)")
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--rewarders", default=",".join(LEARNED + GOLD))
    p.add_argument("--json", default=None, help="write the curves here")
    args = p.parse_args(argv)
    args.d = None if args.d == 0 else args.d
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    names = [n for n in args.rewarders.split(",") if n]
    t0 = time.time()
    curves: dict[str, list[list[tuple[int, float]]]] = {n: [] for n in names}
    info = []
    for seed in range(args.seeds):
        mdp, ref = make_task(args, seed)
        sol = solve(mdp)
        chosen, rejected = preference_pairs(mdp, args.pairs, seed)
        rm, acc = train_reward_model(chosen, rejected, args, seed)
        dpo = train_dpo(ref, chosen, rejected, args, seed) if "implicit" in names else None
        kl_dpo = float(sequence_kl(mdp, policy_log_probs(dpo, mdp), sol.log_pi)) if dpo is not None else float("nan")
        floor = reward_model_floor(mdp, sol, rm, ref, args)
        gold_acc = gold_accuracy(mdp, chosen, rejected)
        info.append(
            {
                "seed": seed,
                "rm_heldout_accuracy": acc,
                "gold_heldout_accuracy": gold_acc,
                "kl_dpo": kl_dpo,
                "kl_rm_optimum": floor,
            }
        )
        print(
            f"seed {seed}: reward model held-out accuracy {acc:.3f} (true reward: {gold_acc:.3f}); "
            f"KL(pi*_RM||pi*) {floor:.4f}; KL(pi_dpo||pi*) {kl_dpo:.4f} [{time.time() - t0:.0f}s]",
            file=sys.stderr,
        )
        for name in names:
            table = reward_lookup(mdp, name, rm, dpo, ref, args)
            curves[name].append(train_policy(ref, mdp, sol, table, args, seed))
            print(f"  {name:<14} final KL {curves[name][-1][-1][1]:.4f} [{time.time() - t0:.0f}s]", file=sys.stderr)

    steps = [s for s, _ in curves[names[0]][0]]
    mean = {n: [sum(c[i][1] for c in curves[n]) / len(curves[n]) for i in range(len(steps))] for n in names}
    d_txt = "to the end" if args.d is None else str(args.d)
    print(
        f"\nKL(pi_theta || pi*) in nats, unified PCL (d={d_txt}), mean of {args.seeds} seeds; "
        f"{mdp.num_sequences} sequences, tau={args.tau}\n"
    )
    print("| rewarder | " + " | ".join(f"step {s}" for s in steps) + " |")
    print("|---|" + "---|" * len(steps))
    for n in names:
        print(f"| {n} | " + " | ".join(f"{v:.4f}" for v in mean[n]) + " |")
    base = mean.get("terminal")
    if base is not None:
        print("\nfinal KL relative to terminal: " + ", ".join(f"{n} {mean[n][-1] / base[-1]:.2f}x" for n in names))

    def avg(key):
        return sum(i[key] for i in info) / len(info)

    print(
        f"\nreward model held-out accuracy {avg('rm_heldout_accuracy'):.3f} (the true reward's: "
        f"{avg('gold_heldout_accuracy'):.3f}); KL(pi*_RM || pi*) = {avg('kl_rm_optimum'):.4f} (the floor for "
        f"rewarders that sum to the reward model's score); KL(pi_dpo || pi*) = {avg('kl_dpo'):.4f}"
    )
    print(f"runtime {time.time() - t0:.0f}s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "info": info, "steps": steps, "curves": curves, "mean": mean}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
