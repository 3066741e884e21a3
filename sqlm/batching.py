"""One optimizer step's batch: which rows are rolled out and which train their offline completions,
the rollouts and replayed samples, their per-token rewards, and the packed tensors.

:class:`BatchBuilder` turns the dataset rows of one micro-batch into a packed batch
(:meth:`BatchBuilder.build`): the offline / online split (mode ``mixed`` rolls out a ``mix_ratio``
share of the prompt groups, with a carried credit so the share is exact over the run), rollouts of
the current policy, replayed samples, scoring (:func:`sqlm.rewards.scoring.score_trajectories`) and
packing (:func:`sqlm.data.pack_trajectories`) with the path mask and the batch's metrics.
:class:`GroupRepeatSampler` draws every prompt ``num_generations`` times in a row (online and mixed).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from .data.trajectories import Trajectory, offline_trajectories, pack_trajectories, passthrough_columns
from .errors import SqlmError
from .guards import nonfinite_reward_source
from .rewards.scoring import score_trajectories
from .rollout import ReplayBuffer
from .soft import fold_rewards_into_path, path_mask
from .train_metrics import batch_metrics


class GroupRepeatSampler(torch.utils.data.Sampler):
    """Dataset indices, each repeated ``repeat`` times in a row (TRL GRPO's ``RepeatSampler`` with
    ``mini_repeat_count``): a batch of ``B`` indices holds ``B / num_generations`` prompts. Shuffled
    per epoch from ``seed + epoch`` (the same order after a resume).

    With ``repeat_count > 1`` (``num_iterations``: several optimizer steps on one generated batch), the
    shuffled prompts are taken ``batch_size`` at a time (the prompts of one optimizer step, over every
    process and accumulated micro-batch) and each chunk is given ``repeat_count`` times in a row, as
    TRL's ``repeat_count``: the steps that reuse a batch see the prompts it was generated from, and an
    epoch still visits every prompt (an incomplete last chunk is dropped)."""

    def __init__(self, n: int, repeat: int, shuffle: bool = True, seed: int = 0, batch_size: int = 1,
                 repeat_count: int = 1):  # fmt: skip
        self.n, self.repeat, self.shuffle, self.seed, self.epoch = n, repeat, shuffle, seed, 0
        self.batch_size, self.repeat_count = batch_size, repeat_count

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        if self.repeat_count == 1:
            chunks = [order]
        else:
            bs = self.batch_size
            chunks = [order[k : k + bs] for k in range(0, self.n - bs + 1, bs)]
        for chunk in chunks:
            for _ in range(self.repeat_count):
                for i in chunk:
                    for _ in range(self.repeat):
                        yield i

    def __len__(self) -> int:
        if self.repeat_count == 1:
            return self.n * self.repeat
        return (self.n // self.batch_size) * self.batch_size * self.repeat * self.repeat_count


def prompt_groups(trajectories: list[Trajectory]) -> torch.Tensor:
    """``[N]`` group ids: trajectories with the same prompt tokens share one (a prompt's online
    completions, a preference pair's two sides, replayed samples of the same prompt)."""
    seen: dict[tuple[int, ...], int] = {}
    return torch.tensor([seen.setdefault(tuple(t.prompt_ids), len(seen)) for t in trajectories], dtype=torch.long)


def _groups(rows: list[dict[str, Any]], size: int) -> list[list[dict[str, Any]]]:
    """Runs of consecutive equal rows (one prompt repeated by the sampler), at most ``size`` long."""
    out: list[list[dict[str, Any]]] = []
    for r in rows:
        if out and len(out[-1]) < size and r == out[-1][0]:
            out[-1].append(r)
        else:
            out.append([r])
    return out


def eos_token_ids(model, tokenizer) -> list[int]:
    """The tokens that end a path: the model's generation config's EOS ids (else the tokenizer's), and
    the tokenizer's EOS."""
    eos = getattr(model.generation_config, "eos_token_id", None) if hasattr(model, "generation_config") else None
    eos = eos if eos is not None else tokenizer.eos_token_id
    ids = [eos] if isinstance(eos, int) else [e for e in (eos or []) if e is not None]
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


# prompts -> one completion per prompt, for training (True) or evaluation
Generate = Callable[[list[list[int]], bool], list[list[int]]]


class BatchBuilder:
    """Builds the packed batches of a run from its dataset rows.

    ``generate`` rolls the current policy out (one completion per prompt); ``on_nonfinite`` is told the
    source of a non-finite reward of a training batch; ``offline_only`` holds the ``id`` of each
    rewarder whose rewards the offline rows already carry as cached columns (it scores online samples
    only). The replay buffer and the mixed-mode credit are the builder's state across steps (saved in
    checkpoints)."""

    def __init__(
        self,
        args,
        tokenizer,
        rewarders: list,
        reward_weights: list[float],
        eos_token_ids: list[int],
        replay_buffer: ReplayBuffer,
        generate: Generate,
        on_nonfinite: Callable[[str], None],
        offline_only: set[int] = frozenset(),
    ):
        self.args = args
        self.tokenizer = tokenizer
        self.rewarders, self.reward_weights = rewarders, reward_weights
        self.pad_token_id = tokenizer.pad_token_id
        self.eos_token_ids = eos_token_ids
        self.replay_buffer = replay_buffer
        self.generate = generate
        self.on_nonfinite = on_nonfinite
        self.offline_only = offline_only
        self.mix_credit = 0.0

    def n_online(self, n_groups: int) -> int:
        """Mixed mode: how many of this batch's prompt groups are rolled out (a carried credit of
        ``mix_ratio`` per group, so the share is exact over the run)."""
        self.mix_credit += self.args.mix_ratio * n_groups
        k = min(n_groups, int(math.floor(self.mix_credit + 1e-9)))
        self.mix_credit -= k
        return k

    def split(self, examples: list[dict[str, Any]], train: bool) -> tuple[list[dict], list[dict]]:
        """(rows to roll out, one completion each; rows whose offline completions are trained).

        Online: every row (a prompt repeated ``num_generations`` times by the sampler). Mixed: the
        rows come in groups of one prompt repeated; a ``mix_ratio`` share of the groups is rolled
        out, every other group gives its row's offline completions once (a preference pair: chosen
        and rejected). Evaluation in mixed mode is offline only."""
        mode = self.args.mode
        if mode == "online":
            return list(examples), []
        if mode == "offline" or not train:  # rows as they come (no repeating sampler)
            return [], list(examples)
        groups = _groups(examples, self.args.num_generations)
        k = self.n_online(len(groups))
        return [r for g in groups[:k] for r in g], [g[0] for g in groups[k:]]

    def rollout(self, rows: list[dict[str, Any]], train: bool = True) -> list[Trajectory]:
        """One completion of the current policy per row (the sampler repeats each prompt
        ``num_generations`` times), as online trajectories."""
        from trl.data_utils import is_conversational

        completions = self.generate([r["prompt_ids"] for r in rows], train)
        out = []
        for row, ids in zip(rows, completions):
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            conv = is_conversational({"prompt": row["prompt"]})
            out.append(
                Trajectory(
                    prompt_ids=list(row["prompt_ids"]),
                    completion_ids=list(ids),
                    prompt=row["prompt"],
                    completion=[{"role": "assistant", "content": text}] if conv else text,
                    columns=passthrough_columns(row),
                    source="online",
                )
            )
        return out

    def trajectories(self, examples: list[dict[str, Any]], train: bool) -> tuple[list, list, list]:
        """``(offline, fresh, replayed)`` trajectories of some dataset rows."""
        args = self.args
        gen_rows, offline_rows = self.split(examples, train)
        trajs: list[Trajectory] = []
        for ex in offline_rows:
            trajs += offline_trajectories(ex, args.chosen_score_column, args.rejected_score_column)
        fresh: list[Trajectory] = self.rollout(gen_rows, train) if gen_rows else []
        replayed: list[Trajectory] = []
        if train and fresh and self.replay_buffer.size > 0:
            k = args.replay_batch_size if args.replay_batch_size is not None else len(fresh)
            replayed = self.replay_buffer.sample(k)
        return trajs, fresh, replayed

    def build(self, examples: list[dict[str, Any]], train: bool = True) -> dict[str, Any]:
        """Trajectories of some dataset rows (offline, online, replayed), scored and packed."""
        args = self.args
        trajs, fresh, replayed = self.trajectories(examples, train)
        all_trajs = trajs + fresh + replayed
        if not all_trajs:
            raise SqlmError("a batch has no trajectories: offline rows without completions and no rollouts")
        online_only = [id(r) in self.offline_only for r in self.rewarders]
        rewards, per_source = score_trajectories(
            all_trajs, self.rewarders, self.reward_weights, self.pad_token_id, args.reward_scale, online_only
        )
        if train:
            bad = nonfinite_reward_source(all_trajs, per_source, rewards)
            if bad is not None:
                self.on_nonfinite(bad)
        if train and fresh:
            fresh_rewards = rewards[len(trajs) : len(trajs) + len(fresh)]
            keep = [i for i, r in enumerate(fresh_rewards) if bool(torch.isfinite(r).all())]
            self.replay_buffer.add([fresh[i] for i in keep], [fresh_rewards[i] for i in keep])

        batch = pack_trajectories(all_trajs, rewards, self.pad_token_id)
        pairs = [
            (i, i + 1)
            for i in range(len(trajs) - 1)
            if trajs[i].source == "chosen" and trajs[i + 1].source == "rejected"
        ]
        if pairs:
            batch["pair_index"] = torch.tensor(pairs, dtype=torch.long)
        batch["group_ids"] = prompt_groups(all_trajs)
        if fresh and self.samples_policy():
            # fresh rollouts drawn from pi itself: their sum of log pi/pi_ref estimates KL(pi||pi_ref)
            on_policy = torch.zeros(len(all_trajs), dtype=torch.bool)
            on_policy[len(trajs) : len(trajs) + len(fresh)] = True
            batch["on_policy"] = on_policy
        actions = batch["input_ids"][:, 1:]
        batch["path_mask"] = path_mask(actions, batch["completion_mask"][:, 1:], self.eos_token_ids)
        # a reward on a token after the path's end (ChatML's "\n" after <|im_end|>) goes to its last step
        batch["token_rewards"][:, 1:] = fold_rewards_into_path(batch["token_rewards"][:, 1:], batch["path_mask"])
        first = batch["completion_mask"].float().argmax(-1)
        batch["logits_start"] = max(int(first.min()) - 1, 0)
        lengths = batch["path_mask"].sum(-1).float()
        batch["sqlm_metrics"] = batch_metrics(all_trajs, rewards, per_source, lengths, self.eos_token_ids, bool(fresh))
        return batch

    def samples_policy(self) -> bool:
        """Online samples come from pi itself (not a tempered or truncated version of it)."""
        a = self.args
        return a.temperature == 1.0 and a.top_p == 1.0 and not a.top_k
