"""``sqlm oracle``: solve a tiny random token MDP exactly and train a tiny LM towards its ``pi*``,
printing the exact ``KL(pi_theta || pi*)`` (the math and the training loop are in ``sqlm.oracle``).

Options are spelled with underscores like the other commands (``--batch_size``); the dashed
spellings (``--batch-size``) are accepted too.
"""

from __future__ import annotations

import argparse
import sys

from ..errors import SqlmError


def _parser() -> argparse.ArgumentParser:
    from ..losses import LOSS_SPECS

    p = argparse.ArgumentParser(
        prog="sqlm oracle",
        description=(
            "Solve a tiny random token MDP exactly (V*, pi* by the soft Bellman recursion) and train a "
            "tiny randomly initialised LM towards pi*, printing the exact KL(pi_theta || pi*)."
        ),
    )
    p.add_argument(
        "--loss",
        "--loss_type",
        dest="loss",
        default="unified_pcl",
        choices=sorted(LOSS_SPECS),
        help="loss to train with",
    )
    p.add_argument("--actions", type=int, default=4, help="size of the action subset, EOS included")
    p.add_argument("--horizon", type=int, default=3, help="length limit H")
    p.add_argument("--reward", default="token", choices=["token", "terminal"], help="per-token or sequence reward")
    p.add_argument("--scale", type=float, default=1.5, help="standard deviation of the random rewards")
    p.add_argument("--tau", type=float, default=1.0, help="temperature")
    p.add_argument("--gamma", type=float, default=1.0, help="discount in (0, 1]")
    p.add_argument("--no_reference", "--no-reference", action="store_true", help="pure max-entropy RL (no pi_ref)")
    p.add_argument("--off_policy", "--off-policy", action="store_true", help="train on samples from pi_ref only")
    p.add_argument("--steps", "--max_steps", dest="steps", type=int, default=500, help="optimizer steps")
    p.add_argument("--batch_size", "--batch-size", type=int, default=128, help="paths per step")
    p.add_argument("--lr", type=float, default=1e-2, help="Adam learning rate (decays linearly to lr/10)")
    p.add_argument("--eval_every", "--eval-every", type=int, default=50, help="steps between exact KL evaluations")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    return p


def main(argv: list[str] | None = None) -> int:
    import torch

    from ..evaluation.oracle_train import tiny_reference_lm, train_towards_oracle
    from ..oracle import random_mdp, solve
    from ..tiny import tiny_causal_lm

    try:
        args = _parser().parse_args(argv)
    except SystemExit as e:  # --help, or argparse's own usage error (already printed)
        return int(e.code or 0)
    if not 2 <= args.actions <= 7:
        raise SqlmError(f"--actions must be in 2..7 (the tiny LM has 8 tokens), got {args.actions}")
    if not 1 <= args.horizon <= 6:
        raise SqlmError(f"--horizon must be in 1..6, got {args.horizon}")
    if args.steps < 0 or args.batch_size < 1 or args.eval_every < 1:
        raise SqlmError("--steps must be >= 0, --batch_size and --eval_every >= 1")
    torch.manual_seed(args.seed)
    vocab = 8
    ref = None if args.no_reference else tiny_reference_lm(vocab, seed=args.seed + 1)
    try:
        mdp = random_mdp(
            num_actions=args.actions,
            horizon=args.horizon,
            reward=args.reward,
            scale=args.scale,
            tau=args.tau,
            gamma=args.gamma,
            ref_model=ref,
            prompt=(vocab - 1,),
            seed=args.seed,
        )
    except ValueError as e:
        raise SqlmError(str(e)) from None
    sol = solve(mdp)
    print(
        f"token MDP: {mdp.num_actions} actions (EOS={mdp.eos}), horizon {mdp.horizon}, "
        f"{mdp.num_states} states, {mdp.num_sequences} sequences; tau={mdp.tau} gamma={mdp.gamma} "
        f"reference={'none' if ref is None else 'tiny LM'} reward={args.reward}"
    )
    print(f"V*(s0) = {sol.v0:.4f}")
    model = tiny_causal_lm(vocab, seed=args.seed + 2, hidden_size=32, num_hidden_layers=1)
    res = train_towards_oracle(
        model,
        sol,
        args.loss,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        on_policy=not args.off_policy,
        eval_every=args.eval_every,
        seed=args.seed,
        progress=True,
    )
    print(f"\nKL(pi_theta || pi*) in nats, {args.loss}, {'off' if args.off_policy else 'on'}-policy")
    print(f"{'step':>6}  {'KL':>10}")
    for step, kl in res.curve:
        print(f"{step:>6}  {kl:>10.4f}")
    sys.stdout.flush()
    return 0
