"""Every loss drives a randomly initialised tiny LM to the exact soft optimum pi* of a tiny token
MDP: KL(pi_theta || pi*) from >= 0.5 to < 0.05 nats, on-policy and off-policy (samples from pi_ref
only), with per-token and with terminal rewards. Guo et al.'s forward forms alone fail where marked;
with their reversed terms (the ``*_mix`` losses) every case converges."""

import pytest

from sqlm.evaluation.oracle_train import tiny_reference_lm, train_towards_oracle
from sqlm.losses import LOSSES
from sqlm.oracle import random_mdp, solve
from sqlm.tiny import tiny_causal_lm


START_KL, END_KL = 0.5, 0.05
STEPS, BATCH = 500, 128
# Adam, decaying linearly to lr/10. The multi-step advantage form is a policy gradient on-policy
# (high variance): it takes a smaller step, and so does group_pcl (REINFORCE with the group mean as baseline).
LR = {
    "pcl": 1e-2,
    "unified_pcl": 1e-2,
    "group_pcl": 5e-3,
    "tbrm": 5e-3,
    "soft_q": 1e-2,
    "advantage_pcl": 1e-2,
    "multistep_pcl": 5e-3,
}
# Guo et al.'s forms with their reversed terms (coefficient 0.5, as train_towards_oracle's default)
LR.update({"advantage_pcl_mix": 1e-2, "multistep_pcl_mix": 5e-3, "guo_pcl_mix": 5e-3, "multistep_soft_q": 5e-3})

ADVANTAGE_REASON = (
    "Guo et al. eq. 9: the gradient only moves A = Q - V = tau log pi, and V_bar (the Polyak copy of "
    "the same logits) is a one-step critic that no term regresses towards V*, so pi fits "
    "r~ + gamma V_bar(s') - V_bar(s) with the wrong V_bar; KL plateaus at 0.4-3 nats"
)
MULTISTEP_OFF_REASON = (
    "Guo et al. eq. 10 on-policy is a soft policy gradient with V_bar as a baseline (converges); on "
    "samples from pi_ref alone it has no importance weights and V_bar is never regressed, so its "
    "fixed point is not pi*; KL plateaus at 0.5-1.2 nats"
)


def _marks(loss, on_policy):
    if loss == "advantage_pcl":
        return [pytest.mark.xfail(strict=True, reason=ADVANTAGE_REASON)]
    if loss == "multistep_pcl" and not on_policy:
        return [pytest.mark.xfail(strict=True, reason=MULTISTEP_OFF_REASON)]
    return []


@pytest.fixture(scope="module")
def oracles():
    """Per-token rewards with a reference LM; terminal rewards with none (pure max-entropy)."""
    return {
        "token": solve(
            random_mdp(
                num_actions=4,
                horizon=3,
                reward="token",
                scale=1.5,
                ref_model=tiny_reference_lm(8, seed=1),
                prompt=(7,),
                seed=0,
            )
        ),
        "terminal": solve(random_mdp(num_actions=4, horizon=3, reward="terminal", scale=1.5, prompt=(7,), seed=0)),
    }


CASES = [
    pytest.param(loss, reward, on, id=f"{loss}-{reward}-{'on' if on else 'off'}", marks=_marks(loss, on))
    for loss in LOSSES
    for reward in ("token", "terminal")
    for on in (True, False)
]


@pytest.mark.parametrize("loss_type,reward,on_policy", CASES)
def test_loss_converges_to_the_oracle(oracles, loss_type, reward, on_policy):
    sol = oracles[reward]
    model = tiny_causal_lm(8, seed=2, hidden_size=32, num_hidden_layers=1)
    res = train_towards_oracle(
        model,
        sol,
        loss_type,
        steps=STEPS,
        batch_size=BATCH,
        lr=LR[loss_type],
        on_policy=on_policy,
        eval_every=100,
        seed=0,
    )
    curve = " ".join(f"{s}:{kl:.3f}" for s, kl in res.curve)
    print(f"\nKL curve {loss_type} {reward} {'on' if on_policy else 'off'}-policy: {curve}")
    assert res.curve[0][1] >= START_KL
    assert res.curve[-1][1] < END_KL, curve
    assert sol.kl(model) == pytest.approx(res.curve[-1][1])


@pytest.mark.parametrize("reward", ["token", "terminal"])
@pytest.mark.parametrize("on_policy", [True, False], ids=["on", "off"])
def test_group_pcl_scaled_by_the_reward_deviation_converges_to_the_same_oracle(oracles, reward, on_policy):
    """``group_scale: group`` weighs each path's squared residual by ``1 / (tau * s)``, ``s`` held constant in
    the gradient: the zero set of the residuals, and with it ``pi*``, is unchanged, on- and off-policy."""
    sol = oracles[reward]
    model = tiny_causal_lm(8, seed=2, hidden_size=32, num_hidden_layers=1)
    res = train_towards_oracle(model, sol, "group_pcl", steps=STEPS, batch_size=BATCH, lr=LR["group_pcl"],
                               on_policy=on_policy, eval_every=100, seed=0, group_scale="group")  # fmt: skip
    curve = " ".join(f"{s}:{kl:.3f}" for s, kl in res.curve)
    assert res.curve[0][1] >= START_KL
    assert res.curve[-1][1] < END_KL, curve
