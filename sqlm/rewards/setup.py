"""The rewards of a training run, set up before its first step.

* :func:`bradley_terry`: ``reward_funcs: [bradley_terry]`` replaced by the token rewarder on a reward
  model fitted on the training pairs (:mod:`sqlm.rewards.auto`);
* :func:`cache_dense_rewards`: the model-based rewarders' dense rewards of the offline rows, computed
  once and cached as dataset columns (:mod:`sqlm.rewards.cache`);
* :func:`data_has_rewards` / :func:`no_reward_message`: the check that a run has some reward signal.
"""

from __future__ import annotations

from typing import Any

from ..paths import cache_dir as sqlm_cache_dir


def bradley_terry(model, tokenizer, train_dataset, args, reward_funcs) -> tuple[Any, dict | None, dict | None]:
    """``(reward_funcs, reward_kwargs, report)`` with ``bradley_terry`` replaced by the token rewarder on
    a reward model fitted on the training pairs, from the initial policy ``model`` (before PEFT);
    ``report`` (None without ``bradley_terry``) holds its held-out accuracy, printed here."""
    from .auto import AUTO_REWARD, bradley_terry_rewarder

    funcs = args.reward_funcs if reward_funcs is None else reward_funcs
    funcs = list(funcs) if isinstance(funcs, (list, tuple)) else ([] if funcs is None else [funcs])
    if AUTO_REWARD not in funcs:
        return reward_funcs, None, None
    cache_root = args.reward_cache_dir or sqlm_cache_dir("rewards")
    rewarder, report = bradley_terry_rewarder(model, tokenizer, train_dataset, args, cache_root)
    how = "fitted" if report["fitted"] else "from the cache"
    if args.should_log:
        print(
            f"{AUTO_REWARD} reward model ({how}, {report['path']}): held-out accuracy "
            f"{report['eval_accuracy']:.3f} on {report['eval_pairs']} pairs it was not fitted on"
        )
    kwargs = {k: v for k, v in (args.reward_kwargs or {}).items() if k != AUTO_REWARD}
    return [rewarder if f == AUTO_REWARD else f for f in funcs], kwargs, report


def bradley_terry_log(report: dict | None) -> dict[str, float]:
    """What the first log of the run shows about a ``bradley_terry`` reward model (``{}`` without one)."""
    if report is None:
        return {}
    return {"reward_model/eval_accuracy": report["eval_accuracy"], "reward_model/eval_pairs": report["eval_pairs"]}


def cache_dense_rewards(dataset, tokenizer, args, rewarders: list, weights: list[float]) -> tuple[Any, set[int]]:
    """``(dataset, offline_only)``: the model-based rewarders (not Python callables) moved into cached
    dataset columns, and the ``id`` of each rewarder that now scores online samples only.

    Their weighted sum is computed once per (data, reward models, settings) by
    :func:`sqlm.rewards.cache.add_token_rewards` and stored as ``chosen_token_rewards`` /
    ``rejected_token_rewards`` (or ``token_rewards``), which offline trajectories carry as data
    rewards. Only with ``cache_token_rewards`` and offline rows (mode offline or mixed); data that is
    already tokenised or already has token-reward columns is left alone (the rewarders stay live).
    """
    if not args.cache_token_rewards or args.mode == "online":
        return dataset, set()
    from accelerate import PartialState

    from .base import CallableRewarder, WeightedSum
    from .cache import ALL_COLUMNS, add_token_rewards

    cached = [i for i, r in enumerate(rewarders) if not isinstance(r, CallableRewarder)]
    cols = getattr(dataset, "column_names", None)
    if not cached or cols is None or "prompt_ids" in cols or any(c in cols for c in ALL_COLUMNS):
        return dataset, set()
    combined = WeightedSum([rewarders[i] for i in cached], [weights[i] for i in cached])
    cache_dir = args.reward_cache_dir or sqlm_cache_dir("rewards")
    with PartialState().main_process_first():
        dataset = add_token_rewards(dataset, combined, tokenizer, cache_dir=cache_dir)
    # offline trajectories now carry these rewards; online ones still need the rewarders live
    return dataset, {id(rewarders[i]) for i in cached}


def data_has_rewards(dataset, args) -> bool:
    """Whether the training rows carry rewards of their own for the paths sqlm trains on (online
    rollouts are scored by reward functions only)."""
    from .cache import ALL_COLUMNS

    if args.mode == "online":
        return False
    cols = set(getattr(dataset, "column_names", None) or [])
    named = {c for c in (args.chosen_score_column, args.rejected_score_column) if c}
    return bool(cols & ({"reward", "label", *ALL_COLUMNS} | named))


def has_no_reward_signal(rewarders: list, dataset, args, explicit_reference: bool) -> bool:
    """No reward, and the reference is the initial policy: the soft optimum is that policy itself, so
    training would change nothing (:func:`no_reward_message` says why and what to add)."""
    return (
        not rewarders
        and not data_has_rewards(dataset, args)
        and args.use_reference
        and not explicit_reference
        and not args.ref_model_name_or_path
    )


def no_reward_message(mode: str) -> str:
    """Why a run without any reward (and with the initial policy as reference) would train nothing:
    for ``r = 0`` the soft optimum ``pi* ~ pi_ref exp(0)`` is the reference, the policy it starts at."""
    fixes = (
        "reward_funcs (e.g. [keyword], or [terminal] with a reward model), or reward_funcs: [bradley_terry] to "
        "fit a reward model on preference pairs"
    )
    if mode == "online":
        return f"no reward signal: mode 'online' scores its samples with reward_funcs only and there are none. Add {fixes}"
    return (
        "no reward signal: no reward_funcs and no reward column in the data, so training would change nothing "
        "(chosen/rejected labels alone are not a reward). Add a reward column (reward, label, chosen_score_column / "
        f"rejected_score_column, token rewards), {fixes}; or train on the pairs with `sqlm dpo`"
    )
