"""SoftQTrainer: a ``transformers.Trainer`` that fits a causal LM with the path-consistency losses.

Per optimizer step:

1. ``get_batch_samples`` turns the dataset rows of every gradient-accumulation micro-batch into
   trajectories (offline completions, online rollouts of the current policy, replayed samples),
   scores them into per-token rewards ``r[t]`` and packs them (``sqlm.data.pack_trajectories``);
   it also counts the normaliser of the loss over the whole optimizer batch (all micro-batches and
   all processes), so gradient accumulation and data parallelism give the gradient of one big batch.
2. ``compute_loss`` reads the model through ``sqlm.forward`` (Q, V, log pi of the taken tokens, the
   reference ``log pi_ref`` and the target network's ``V_bar`` when used) and calls the loss's entry
   of ``sqlm.losses.LOSS_SPECS`` with per-step tensors, reduced by ``sqlm.losses.normaliser``.
3. :class:`TargetNetworkCallback` moves the target network towards the policy after the step
   (Polyak averaging), never inside ``compute_loss``.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
import time
from collections import defaultdict
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase, Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .config import SoftQConfig
from .data import (
    DataCollatorForSoftQ,
    Trajectory,
    _passthrough_columns,
    offline_trajectories,
    pack_trajectories,
    prepare_dataset,
)
from . import checkpoint as ckpt
from .checkpoint import mark_complete
from .errors import SqlmError
from .forward import (
    TARGET_ADAPTER,
    VALUE_HEAD_ATTR,
    adapter_active,
    add_target_adapter,
    attach_value_head,
    local_shard,
    model_log_pi,
    model_values,
    policy_soft_outputs,
    polyak_update,
)
from .guards import NonFiniteError, nonfinite_reward_source, nonfinite_value_source
from .losses import loss_spec, normaliser, reduced_sum
from .paths import cache_dir as sqlm_cache_dir
from .rewards.base import TokenRewarder
from .rewards.registry import resolve_rewarders
from .rewards.scoring import score_trajectories
from .rollout import ReplayBuffer, generate_completions, generate_completions_vllm, vllm_generation
from .soft import SoftOutputs, path_mask

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- target network


def _trainable_names(model: nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad and VALUE_HEAD_ATTR not in n]


class TargetNetworkCallback(TrainerCallback):
    """Updates the target network after every ``target_model_sync_steps`` optimizer steps."""

    def __init__(self, trainer: SoftQTrainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        # A sharded target starts as an exact copy of the sharded policy, made shard by shard: ranks
        # that loaded no weights (e.g. FSDP's cpu_ram_efficient_loading) got theirs by broadcast only
        # into the policy. A resumed run keeps the target it loaded.
        t = self.trainer
        if t.target_is_sharded and not t._target_loaded:
            policy = t.accelerator.unwrap_model(t.model)
            target = getattr(t.target_model, "module", t.target_model)
            if any(p.is_meta for p in target.parameters()):
                target.to_empty(device=t.accelerator.device)
            polyak_update(policy, target, 1.0, t._target_names)
            buffers = dict(policy.named_buffers())
            with torch.no_grad():
                for n, b in target.named_buffers():
                    if n in buffers:
                        b.copy_(buffers[n])

    def on_step_end(self, args, state, control, **kwargs):
        if self.trainer._step_skipped:  # nan_policy skip: the step changed nothing
            return
        if state.global_step % args.target_model_sync_steps == 0:
            self.trainer.update_target_model()


class NonFiniteCallback(TrainerCallback):
    """Acts on a NaN/inf found while building or computing this optimizer step (rewards, values,
    loss), before the optimizer sees the gradients: ``nan_policy: stop`` raises
    :class:`sqlm.guards.NonFiniteError` (no update, no checkpoint of the bad state); ``skip`` drops
    the gradients (``grad = None``: the optimizer leaves every parameter and its moments alone) and
    counts the step. The decision is shared by every process."""

    def __init__(self, trainer: SoftQTrainer):
        self.trainer = trainer

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        t = self.trainer
        bad = torch.tensor([1.0 if t._nonfinite else 0.0], device=args.device)
        if args.world_size > 1:
            bad = t.accelerator.reduce(bad, reduction="sum")
        if bad.item() == 0:
            return
        step = state.global_step + 1
        source = t._nonfinite or "value or loss on another process"
        if args.nan_policy == "stop":
            raise NonFiniteError(source, step)
        t._step_skipped = True
        t._skipped_steps += 1
        for p in t.model.parameters():
            p.grad = None
        logger.warning("skipped step %d: non-finite %s (%d step(s) skipped so far)", step, source, t._skipped_steps)


# ----------------------------------------------------------------------------- trainer


class SoftQTrainer(Trainer):
    """Soft Q-learning / path-consistency fine-tuning of a causal LM (see the module docstring).

    Args:
        model: a ``PreTrainedModel`` or a hub id / local path (loaded with ``args.model_init_kwargs``).
        args: :class:`sqlm.config.SoftQConfig`.
        train_dataset / eval_dataset: ``datasets.Dataset`` in a TRL format (``sqlm.data``), raw or
            already tokenised with :func:`sqlm.data.prepare_dataset`.
        processing_class: the tokenizer (default: loaded from the model's path).
        reward_funcs: rewarders (``TokenRewarder``), TRL-signature callables, or names resolved by
            :func:`sqlm.rewards.resolve_rewarders`; default ``args.reward_funcs``.
        reward_search_dirs: folders where ``module:function`` reward modules are looked up before the
            current directory and the Python path (``sqlm train`` passes the recipe's folder).
        ref_model: explicit reference policy. Without it: with PEFT, the base model with the adapter
            disabled; otherwise a frozen copy of the initial policy (``args.use_reference=False``:
            no reference, plain max-entropy RL).
        peft_config: a ``peft.PeftConfig`` (e.g. LoRA) applied to the model.
    """

    _tag_names = ["sqlm", "soft-q"]
    # compute_loss divides by the item count of the whole optimizer batch (see get_batch_samples)
    loss_is_scaled_for_ga = True

    def __init__(
        self,
        model,
        args: SoftQConfig | None = None,
        train_dataset=None,
        eval_dataset=None,
        processing_class: PreTrainedTokenizerBase | None = None,
        reward_funcs=None,
        ref_model=None,
        peft_config=None,
        callbacks: list[TrainerCallback] | None = None,
        optimizers=(None, None),
        reward_search_dirs: list[str] | None = None,
    ):
        from transformers import set_seed
        from trl.trainer.utils import disable_dropout_in_model

        from .loading import load_model, load_tokenizer, model_init_kwargs

        if args is None:
            args = SoftQConfig(output_dir="sqlm-output")
        if not isinstance(args, SoftQConfig):
            raise TypeError(f"args must be a SoftQConfig, got {type(args).__name__}")
        if train_dataset is None:
            raise SqlmError("SoftQTrainer needs a train_dataset")
        set_seed(args.seed)

        init_kwargs = model_init_kwargs(args)  # safetensors only; remote code only when asked

        def load(name: str):
            return load_model(name, init_kwargs)

        if isinstance(model, str):
            model = load(model)
        if isinstance(ref_model, str):
            ref_model = load(ref_model)
        elif ref_model is None and args.use_reference and args.ref_model_name_or_path:
            ref_model = load(args.ref_model_name_or_path)
        if ref_model is model and model is not None:
            raise SqlmError("model and ref_model must be different objects (omit ref_model to copy the policy)")

        if processing_class is None:
            trust = init_kwargs["trust_remote_code"]
            processing_class = load_tokenizer(model.config._name_or_path, trust_remote_code=trust)
        if processing_class.pad_token is None:
            processing_class.pad_token = processing_class.eos_token
        model.config.pad_token_id = processing_class.pad_token_id
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.pad_token_id = processing_class.pad_token_id

        # Reference: explicit; the PEFT base (adapter disabled); a frozen copy; or none. Precomputed
        # offline (precompute_ref_log_probs, mode offline), the initial policy itself is read once
        # before training instead of a copy.
        self._ref_is_base = False
        ref_is_policy = False
        if not args.use_reference:
            ref_model = None
        elif ref_model is None:
            if peft_config is not None or _is_peft(model):
                self._ref_is_base = True
            elif args.precompute_ref_log_probs and args.mode == "offline":
                ref_is_policy = True
            else:
                ref_model = copy.deepcopy(model)

        if peft_config is not None:
            from peft import get_peft_model

            if _is_peft(model):
                raise SqlmError("model already has a PEFT adapter; pass its base model with peft_config")
            model = get_peft_model(model, peft_config)

        # Target network: with PEFT a second adapter on the same frozen base; else a frozen copy
        self.target_model = None
        self._target_pairs: list[tuple[str, str]] | None = None  # (policy adapter, target adapter) names
        self._target_loaded = False  # restored from a checkpoint
        if args.uses_target_model:
            if _is_peft(model):
                self._target_pairs = add_target_adapter(model, TARGET_ADAPTER)
            else:
                self.target_model = copy.deepcopy(model)
        if args.uses_value_head:
            attach_value_head(model)

        for m in (ref_model, self.target_model):
            if m is not None:
                m.eval()
                m.requires_grad_(False)
        if args.disable_dropout:
            for m in (model, ref_model, self.target_model):
                if m is not None:
                    disable_dropout_in_model(m)

        # Rewards
        self.rewarders: list[TokenRewarder]
        self.rewarders, self.reward_weights = resolve_rewarders(
            args, processing_class, reward_funcs, search_dirs=reward_search_dirs or ()
        )

        # Dense rewards of model-based rewarders on offline data: computed once, cached as columns
        self._offline_only_rewarders: set[int] = set()
        if args.cache_token_rewards and args.mode != "online":
            train_dataset = self._cache_dense_rewards(train_dataset, processing_class, args)

        # Data
        if hasattr(train_dataset, "column_names") and "prompt_ids" not in train_dataset.column_names:
            train_dataset = prepare_dataset(train_dataset, processing_class, args, name="train")
        if eval_dataset is not None and "prompt_ids" not in eval_dataset.column_names:
            eval_dataset = prepare_dataset(eval_dataset, processing_class, args, name="eval")

        # Reference values of the offline rows: one pass, cached columns; mode offline then keeps no
        # reference model at all (mixed keeps it for the online samples)
        self._ref_precomputed = False
        if args.precompute_ref_log_probs and (ref_model is not None or self._ref_is_base or ref_is_policy):
            reader = model if ref_model is None else ref_model
            pad = processing_class.pad_token_id
            train_dataset = self._precompute_reference(reader, train_dataset, args, pad, args.per_device_train_batch_size)
            if eval_dataset is not None:
                eval_dataset = self._precompute_reference(reader, eval_dataset, args, pad, args.per_device_eval_batch_size)
            self._ref_precomputed = True
            if args.mode == "offline":
                ref_model, self._ref_is_base = None, False

        super().__init__(
            model=model,
            args=args,
            data_collator=DataCollatorForSoftQ(),
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            callbacks=callbacks,
            optimizers=optimizers,
        )

        self.ref_model = self._prepare_aux(ref_model)
        self.target_model = self._prepare_aux(self.target_model)
        if self.target_model is not None:
            self._target_names = _trainable_names(self.model)
        if self.has_target:
            self.add_callback(TargetNetworkCallback(self))

        tok = processing_class
        eos = getattr(self.model.generation_config, "eos_token_id", None) if hasattr(self.model, "generation_config") else None
        eos = eos if eos is not None else tok.eos_token_id
        self.eos_token_ids = [eos] if isinstance(eos, int) else [e for e in (eos or []) if e is not None]
        if tok.eos_token_id is not None and tok.eos_token_id not in self.eos_token_ids:
            self.eos_token_ids.append(tok.eos_token_id)
        self.pad_token_id = tok.pad_token_id
        self.replay_buffer = ReplayBuffer(args.replay_buffer_size, seed=args.seed + self.args.process_index)
        self._mix_credit = 0.0
        self._nonfinite: str | None = None  # what was non-finite in this optimizer step
        self._step_skipped = False
        self._skipped_steps = 0
        self._rng_pending: str | None = None  # checkpoint whose RNG state is restored before the next batch
        self.add_callback(NonFiniteCallback(self))
        self._metrics: dict[str, dict[str, list[float]]] = {"train": defaultdict(list), "eval": defaultdict(list)}
        # vLLM rollouts (use_vllm, checked in SoftQConfig): weights pushed before the first rollout of each step
        self.vllm_generation = vllm_generation(self) if args.use_vllm else None
        self._vllm_synced_step = -1
        if hasattr(self.model, "add_model_tags"):
            self.model.add_model_tags(self._tag_names)

    # ------------------------------------------------------------------ setup helpers

    def _cache_dense_rewards(self, dataset, tokenizer, args):
        """Move the model-based rewarders (not Python callables) into cached dataset columns.

        Their weighted sum is computed once per (data, reward models, settings) by
        :func:`sqlm.rewards.cache.add_token_rewards` and stored as ``chosen_token_rewards`` /
        ``rejected_token_rewards`` (or ``token_rewards``), which offline trajectories carry as data
        rewards. Those rewarders then score only online samples. Data that is already tokenised or
        already has token-reward columns is left alone (the rewarders stay live).
        """
        from accelerate import PartialState

        from .rewards.base import CallableRewarder, WeightedSum
        from .rewards.cache import ALL_COLUMNS, add_token_rewards

        cached = [i for i, r in enumerate(self.rewarders) if not isinstance(r, CallableRewarder)]
        cols = getattr(dataset, "column_names", None)
        if not cached or cols is None or "prompt_ids" in cols or any(c in cols for c in ALL_COLUMNS):
            return dataset
        combined = WeightedSum([self.rewarders[i] for i in cached], [self.reward_weights[i] for i in cached])
        cache_dir = args.reward_cache_dir or sqlm_cache_dir("rewards")
        with PartialState().main_process_first():
            dataset = add_token_rewards(dataset, combined, tokenizer, cache_dir=cache_dir)
        # offline trajectories now carry these rewards; online ones still need the rewarders live
        self._offline_only_rewarders = {id(self.rewarders[i]) for i in cached}
        return dataset

    def _precompute_reference(self, reader, dataset, args: SoftQConfig, pad_token_id: int, batch_size: int):
        """``dataset`` with the reference columns of :mod:`sqlm.reference` (computed once by the main
        process, then read from the cache by the others). ``reader`` is the explicit reference, or the
        policy before its first step: with PEFT read with every adapter disabled, else as it is (the
        initial policy is the reference)."""
        from accelerate import PartialState

        from .reference import add_ref_columns, reference_fingerprint

        peft_base = self._ref_is_base  # reader is the PEFT policy; its base is the reference
        device = args.device
        reader.to(device)
        precision = "bf16" if args.bf16 else "fp16" if args.fp16 else "float32"
        amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)

        def ref_fn(batch):
            with contextlib.ExitStack() as stack:
                if amp is not None:
                    stack.enter_context(torch.autocast(device_type=device.type, dtype=amp))
                if peft_base:
                    stack.enter_context(adapter_active(reader, None))
                else:
                    was_training = reader.training
                    reader.eval()
                    stack.callback(reader.train, was_training)
                return model_log_pi(reader, batch, return_lse=True)

        with PartialState().main_process_first():
            return add_ref_columns(
                dataset, ref_fn, ref_fingerprint=reference_fingerprint(reader, skip_adapters=peft_base),
                pad_token_id=pad_token_id,
                batch_size=args.precompute_ref_batch_size or batch_size, precision=precision,
                cache_dir=sqlm_cache_dir("reference"), device=device,
            )

    def _prepare_aux(self, m):
        if m is None:
            return None
        # the target network is sharded exactly as the reference (TRL's prepare_deepspeed / prepare_fsdp),
        # so its pieces line up with the policy's for the shard-by-shard Polyak update
        if self.is_deepspeed_enabled:
            from trl.models import prepare_deepspeed

            return prepare_deepspeed(m, self.accelerator)
        if self.is_fsdp_enabled:
            if m is self.target_model and getattr(self.accelerator.state.fsdp_plugin, "fsdp_version", 1) != 2:
                raise SqlmError("a target network needs FSDP2 (fsdp_version: 2 in the accelerate config)")
            from trl.models import prepare_fsdp

            return prepare_fsdp(m, self.accelerator)
        return self.accelerator.prepare_model(m, evaluation_mode=True)

    @property
    def target_is_sharded(self) -> bool:
        """The target network is a separate model sharded by ZeRO-3 or FSDP (saved per process)."""
        if self.target_model is None:
            return False
        zero3 = self.is_deepspeed_enabled and self.accelerator.state.deepspeed_plugin.zero_stage == 3
        return zero3 or self.is_fsdp_enabled

    def _target_file(self, folder: str) -> str | None:
        """Where this process saves / loads the target network: every process its own shards
        (``target_model_rank{i}.safetensors``) when sharded, else the main process the whole of it."""
        if self.target_is_sharded:
            name = ckpt.TARGET_FILE.replace(".safetensors", f"_rank{self.args.process_index}.safetensors")
            return os.path.join(folder, name)
        return os.path.join(folder, ckpt.TARGET_FILE) if self.args.should_save else None

    @property
    def has_target(self) -> bool:
        """A target network is kept: a frozen copy (``target_model``) or, with PEFT, the adapter ``target``."""
        return self.target_model is not None or self._target_pairs is not None

    def update_target_model(self) -> None:
        """Polyak step of the target network towards the policy (the TargetNetworkCallback calls it);
        with a target adapter only the adapter weights move."""
        policy = self.accelerator.unwrap_model(self.model)
        alpha = self.args.target_model_mixup_alpha
        if self._target_pairs is not None:
            polyak_update(policy, policy, alpha, pairs=self._target_pairs)
        elif self.target_model is not None:
            target = getattr(self.target_model, "module", self.target_model)
            polyak_update(policy, target, alpha, self._target_names)

    def target_values(self, model, inputs) -> torch.Tensor | None:
        """``V_bar(s_t)`` of the target network ``[N, T]`` (no grad), or None without one. A target
        adapter is made active for this forward (eval mode); the policy adapter comes back after."""
        if self.target_model is not None:
            return model_values(self.target_model, inputs, self.args.tau)
        if self._target_pairs is None:
            return None
        unwrapped = self.accelerator.unwrap_model(model)
        with torch.no_grad(), adapter_active(unwrapped, TARGET_ADAPTER):
            return model_values(unwrapped, inputs, self.args.tau)

    def target_state_dict(self) -> dict[str, torch.Tensor]:
        """The target network's own weights (what a checkpoint must keep): the trainable parameters
        of the copy, or the target adapter's parameters."""
        if self._target_pairs is not None:
            params = dict(self.accelerator.unwrap_model(self.model).named_parameters())
            return {d: local_shard(params[d]).detach() for _, d in self._target_pairs}
        if self.target_model is None:
            return {}
        target = dict(getattr(self.target_model, "module", self.target_model).named_parameters())
        return {n: local_shard(target[n]).detach() for n in self._target_names}

    @torch.no_grad()
    def load_target_state_dict(self, state: dict[str, torch.Tensor], where: str) -> None:
        """Copy ``state`` (:meth:`target_state_dict`'s names) into the target network."""
        if self._target_pairs is not None:
            params = dict(self.accelerator.unwrap_model(self.model).named_parameters())
        else:
            params = dict(getattr(self.target_model, "module", self.target_model).named_parameters())
        expected = set(self.target_state_dict())
        if set(state) != expected:
            odd = min(set(state) ^ expected)
            raise SqlmError(f"{where}: the saved target network does not match this one (parameter '{odd}')")
        for n, t in state.items():
            piece = local_shard(params[n])
            if piece.shape != t.shape:
                raise SqlmError(f"{where}: target parameter '{n}' was saved with shape {tuple(t.shape)}, this process "
                                f"holds {tuple(piece.shape)} (a sharded checkpoint resumes on the same number of processes)")
            piece.copy_(t.to(piece.device, piece.dtype))
        self._target_loaded = True

    # ------------------------------------------------------------------ trajectories

    def _n_online(self, n_rows: int) -> int:
        if self.args.mode == "online":
            return n_rows
        if self.args.mode == "offline":
            return 0
        self._mix_credit += self.args.mix_ratio * n_rows
        k = min(n_rows, int(math.floor(self._mix_credit + 1e-9)))
        self._mix_credit -= k
        return k

    def _rollout(self, rows: list[dict[str, Any]]) -> list[Trajectory]:
        """Sample ``num_generations`` completions per row's prompt from the current policy (vLLM with
        ``use_vllm``, else HF generate) and log which generator ran and how fast."""
        from trl.data_utils import is_conversational

        g = self.args.num_generations
        prompts = [r["prompt_ids"] for r in rows for _ in range(g)]
        started = time.perf_counter()
        if self.vllm_generation is not None:
            if self.state.global_step != self._vllm_synced_step:  # the policy moved since the last push
                self.vllm_generation.sync_weights()
                self._vllm_synced_step = self.state.global_step
            completions = generate_completions_vllm(self.vllm_generation, prompts, g, self.eos_token_ids)
            generator = f"vllm_{self.args.vllm_mode}"
        else:
            completions = generate_completions(
                self.model_wrapped,
                self.accelerator,
                prompts,
                pad_token_id=self.pad_token_id,
                eos_token_ids=self.eos_token_ids,
                max_new_tokens=self.args.max_completion_length,
                temperature=self.args.temperature,
                top_p=self.args.top_p,
                top_k=self.args.top_k,
                generation_kwargs=self.args.generation_kwargs,
                gradient_checkpointing_kwargs=self.args.gradient_checkpointing_kwargs,
            )
            generator = "hf"
        seconds = time.perf_counter() - started
        metrics = self._metrics["train" if self.model.training else "eval"]
        metrics[f"generation/{generator}/seconds"].append(seconds)
        metrics[f"generation/{generator}/tokens_per_second"].append(sum(map(len, completions)) / max(seconds, 1e-9))
        out = []
        for i, ids in enumerate(completions):
            row = rows[i // g]
            text = self.processing_class.decode(ids, skip_special_tokens=True)
            conv = is_conversational({"prompt": row["prompt"]})
            out.append(
                Trajectory(
                    prompt_ids=list(row["prompt_ids"]),
                    completion_ids=list(ids),
                    prompt=row["prompt"],
                    completion=[{"role": "assistant", "content": text}] if conv else text,
                    columns=_passthrough_columns(row),
                    source="online",
                )
            )
        return out

    def build_batch(self, examples: list[dict[str, Any]], train: bool = True) -> dict[str, Any]:
        """Trajectories of some dataset rows (offline, online, replayed), scored and packed."""
        args = self.args
        n_online = 0 if (not train and args.mode == "mixed") else self._n_online(len(examples))
        gen_rows = examples[:n_online]
        trajs: list[Trajectory] = []
        for ex in examples[n_online:]:
            trajs += offline_trajectories(ex, args.chosen_score_column, args.rejected_score_column)
        fresh: list[Trajectory] = self._rollout(gen_rows) if gen_rows else []
        replayed: list[Trajectory] = []
        if train and fresh and self.replay_buffer.size > 0:
            k = args.replay_batch_size if args.replay_batch_size is not None else len(fresh)
            replayed = self.replay_buffer.sample(k)
        all_trajs = trajs + fresh + replayed
        if not all_trajs:
            raise SqlmError("a batch has no trajectories: offline rows without completions and no rollouts")
        online_only = [id(r) in self._offline_only_rewarders for r in self.rewarders]
        rewards, per_source = score_trajectories(
            all_trajs, self.rewarders, self.reward_weights, self.pad_token_id, args.reward_scale, online_only
        )
        if train:
            bad = nonfinite_reward_source(all_trajs, per_source, rewards)
            if bad is not None and self._nonfinite is None:
                self._nonfinite = bad
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
        actions = batch["input_ids"][:, 1:]
        batch["path_mask"] = path_mask(actions, batch["completion_mask"][:, 1:], self.eos_token_ids)
        first = batch["completion_mask"].float().argmax(-1)
        batch["logits_start"] = max(int(first.min()) - 1, 0)
        metrics = {f"rewards/{k}/mean": sum(v) / max(len(v), 1) for k, v in per_source.items()}
        by_source: dict[str, list[float]] = {}
        for t, r in zip(all_trajs, rewards):
            by_source.setdefault(t.source, []).append(float(r.sum()))
        for k, v in by_source.items():
            metrics[f"rewards/{k}"] = sum(v) / len(v)
        metrics["completions/mean_length"] = float(batch["path_mask"].sum(-1).mean())
        if fresh:
            metrics["completions/online_fraction"] = len(fresh) / len(all_trajs)
            metrics["completions/online_mean_length"] = sum(len(t.completion_ids) for t in fresh) / len(fresh)
        batch["sqlm_metrics"] = metrics
        return batch

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """Build every micro-batch of the optimizer step and count the loss normaliser over all of
        them and all processes (so accumulation and data parallelism match one big batch)."""
        raw, _ = super().get_batch_samples(epoch_iterator, num_batches, device)
        self._nonfinite, self._step_skipped = None, False
        if self._rng_pending is not None:
            # resuming: the checkpoint's RNG state must be in place before rollouts sample from it
            # (the Trainer itself restores it only after this method has run)
            self._load_rng_state(self._rng_pending)
        batches = [self.build_batch(b["examples"], train=True) for b in raw]
        if not batches:
            return batches, None
        total = sum(normaliser(b["path_mask"], self.args.reduction) for b in batches).float().to(self.args.device)
        if self.args.world_size > 1:
            total = self.accelerator.gather(total.reshape(1)).sum()
        return batches, total

    # ------------------------------------------------------------------ loss

    def reference_log_pi(self, model, inputs, return_lse: bool = False):
        """``log pi_ref(a_t|s_t)`` ``[N, T]`` (with ``return_lse`` also ``logsumexp z_ref(s_t)``): the
        precomputed columns of the rows that carry them (``precompute_ref_log_probs``), and for the
        others the explicit reference model, the PEFT base model with the adapter disabled, or None
        (no reference)."""
        pre = inputs.get("ref_precomputed")
        if pre is None or not bool(pre.any()):
            return self._live_reference_log_pi(model, inputs, return_lse)
        start = int(inputs["logits_start"])
        log_pi, lse = inputs["ref_log_probs"][:, start + 1 :], inputs["ref_logsumexp"][:, start + 1 :]
        if not bool(pre.all()):  # e.g. mixed mode: the online rows need the live reference
            rows = (~pre).nonzero().squeeze(-1)
            sub = {k: inputs[k][rows] for k in ("input_ids", "attention_mask", "path_mask") if k in inputs}
            live = self._live_reference_log_pi(model, {**sub, "logits_start": start}, True)
            if live[0] is None:
                raise SqlmError("a batch has rows without precomputed reference log-probs (precompute_ref_log_probs) "
                                "and no reference model is loaded")
            log_pi, lse = log_pi.clone(), lse.clone()
            log_pi[rows], lse[rows] = live[0].to(log_pi.dtype), live[1].to(lse.dtype)
        return (log_pi, lse) if return_lse else log_pi

    def _live_reference_log_pi(self, model, inputs, return_lse: bool = False):
        if self.ref_model is not None:
            return model_log_pi(self.ref_model, inputs, return_lse)
        if self._ref_is_base:
            unwrapped = self.accelerator.unwrap_model(model)
            with adapter_active(unwrapped, None):
                return model_log_pi(unwrapped, inputs, return_lse)
        return (None, None) if return_lse else None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        args = self.args
        mode = "train" if self.model.training else "eval"
        if "examples" in inputs:  # raw rows (e.g. from a custom loop): build the batch here
            inputs = self._prepare_inputs(self.build_batch(inputs["examples"], train=mode == "train"))
        start = int(inputs["logits_start"])
        spec = loss_spec(args.loss_type)
        soft, head_v = policy_soft_outputs(model, inputs, args.tau, with_values=spec.needs_value_head)
        mask = inputs["path_mask"][:, start:].float()
        rewards = inputs["token_rewards"][:, start + 1 :]

        ref_log_pi, ref_lse = self.reference_log_pi(model, inputs, return_lse=True)
        target_v = self.target_values(model, inputs)
        if args.value_anchor == "reference" and ref_lse is not None and not spec.needs_value_head:
            # values measured from the reference's logsumexp: pi is unchanged, V = 0 where pi = pi_ref
            anchor = args.tau * ref_lse * mask
            soft = SoftOutputs(q=soft.q - anchor, v=soft.v - anchor, log_pi=soft.log_pi, entropy=soft.entropy)
            if target_v is not None:
                target_v = target_v - anchor

        per_step, stats = spec(
            soft, rewards, mask, value=head_v, target_v=target_v, d=args.rollout_length, tau=args.tau,
            gamma=args.gamma, ref_log_pi=ref_log_pi, reduction="none",
        )
        # the normaliser of the whole optimizer batch (get_batch_samples), else of this batch alone
        total = normaliser(mask, args.reduction) if num_items_in_batch is None else num_items_in_batch
        numerator = reduced_sum(per_step, mask, args.reduction)
        loss = numerator / torch.as_tensor(total, device=numerator.device).clamp(min=1.0)
        if num_items_in_batch is not None and args.world_size > 1:  # DDP averages gradients over processes
            loss = loss * args.world_size

        if mode == "train" and not bool(torch.isfinite(loss.detach())):
            if self._nonfinite is None:  # name the first non-finite input of the loss
                self._nonfinite = nonfinite_value_source(
                    {
                        "reward": rewards,
                        "value V(s) of the policy": soft.v,
                        "Q(s, a) of the policy": soft.q,
                        "log pi(a|s) of the policy": soft.log_pi,
                        "log pi_ref(a|s) of the reference model": ref_log_pi,
                        "value V_bar(s) of the target network": target_v,
                        "value V_phi(s) of the value head": head_v,
                    },
                    mask,
                ) or "loss"

        metrics = self._metrics[mode]
        if ref_log_pi is not None and "pair_index" in inputs:
            # tau * sum_t log pi/pi_ref of chosen minus rejected: DPO's implied reward margin; at the
            # optimum pi* ~ pi_ref exp(R/tau) it equals R(chosen) - R(rejected)
            with torch.no_grad():
                seq = args.tau * ((soft.log_pi.detach() - ref_log_pi) * mask).sum(-1)
                idx = inputs["pair_index"]
                metrics["rewards/implied_margin"].append((seq[idx[:, 0]] - seq[idx[:, 1]]).mean().item())
        for k, v in stats.items():
            metrics[k].append(v)
        for k, v in (inputs.get("sqlm_metrics") or {}).items():
            metrics[k].append(float(v))
        return (loss, {"per_step_loss": per_step}) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        batch = self._prepare_inputs(self.build_batch(inputs["examples"], train=False))
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, batch)
        return loss.detach(), None, None

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if self.model.training else "eval"
        local = {k: [v for v in vals if not math.isnan(v)] for k, vals in self._metrics[mode].items()}
        if self.args.world_size > 1:  # average over every process's values
            from accelerate.utils import gather_object

            merged: dict[str, list[float]] = defaultdict(list)
            for part in gather_object([local]):
                for k, vals in part.items():
                    merged[k].extend(vals)
            local = merged
        metrics = {k: (sum(v) / len(v) if v else None) for k, v in local.items()}
        if mode == "eval":
            metrics = {f"eval_{k}": v for k, v in metrics.items()}
        logs.update(metrics)
        if mode == "train" and self._skipped_steps:
            logs["nonfinite/skipped_steps"] = self._skipped_steps
        super().log(logs, start_time)
        self._metrics[mode].clear()

    # ------------------------------------------------------------------ checkpoints

    def train(self, resume_from_checkpoint: str | bool | None = None, trial=None, ignore_keys_for_eval=None, **kwargs):
        """``Trainer.train``, resuming only from complete checkpoints: ``True`` / ``"latest"`` picks the
        newest complete one of ``output_dir`` (a folder half-written by a killed run is skipped), a
        path must be complete (see :mod:`sqlm.checkpoint`)."""
        folder = ckpt.resolve_resume(resume_from_checkpoint, self.args.output_dir)
        self._rng_pending = folder
        return super().train(
            resume_from_checkpoint=folder, trial=trial, ignore_keys_for_eval=ignore_keys_for_eval, **kwargs
        )

    def _load_rng_state(self, checkpoint):
        # restored once per resume, before the first resumed batch is built (see get_batch_samples)
        if checkpoint is None or checkpoint != self._rng_pending:
            return
        self._rng_pending = None
        super()._load_rng_state(checkpoint)

    def _save_checkpoint(self, model, trial):
        """Save a checkpoint so that a kill at any moment leaves either a complete checkpoint or a
        folder without the completion marker (which resuming skips): any old folder of this step is
        removed first, every process writes its files, then the main process fsyncs them and writes
        the marker, and only then are old checkpoints rotated out (``save_total_limit``)."""
        run_dir = self._get_output_dir(trial=trial)
        folder = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        if self.args.should_save:
            ckpt.clear_partial(folder)  # e.g. half-written by a run that was killed while saving it
        self.accelerator.wait_for_everyone()
        limit = self.args.save_total_limit
        self.args.save_total_limit = None  # rotate only once this checkpoint is complete
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.save_total_limit = limit
        self.save_aux_state(folder)
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            mark_complete(folder, self.state.global_step)
            ckpt.rotate(run_dir, limit, self.state.best_model_checkpoint)

    def save_aux_state(self, folder: str) -> None:
        """Save what the HF checkpoint lacks into ``folder``: the target network (safetensors), this
        process's replay buffer and the mixed-mode credit / skip count (JSON; no pickles)."""
        ckpt.save_aux_state(
            folder, replay_buffer=self.replay_buffer, process_index=self.args.process_index,
            is_main=self.args.should_save, counters={"mix_credit": self._mix_credit, "skipped_steps": self._skipped_steps},
        )
        # the target network (a copy, an adapter, or this process's shards of a sharded one)
        target_file = self._target_file(folder) if self.has_target else None
        if target_file is not None:
            from safetensors.torch import save_file

            save_file({n: t.contiguous().cpu() for n, t in self.target_state_dict().items()}, target_file)

    def _load_optimizer_and_scheduler(self, checkpoint):
        import pickle

        try:  # transformers reads these torch files with weights_only=True: no code runs
            super()._load_optimizer_and_scheduler(checkpoint)
        except pickle.UnpicklingError as e:
            msg = " ".join(str(e).split())[:300]
            raise SqlmError(f"checkpoint {checkpoint}: refusing to load optimizer/scheduler state that holds "
                            f"more than tensors (weights_only load failed: {msg})") from None
        if checkpoint is not None:
            self.load_aux_state(checkpoint)

    def load_aux_state(self, folder: str) -> None:
        """Restore the target network, replay buffer and trainer counters saved by :meth:`save_aux_state`."""
        if self.has_target:
            path = self._target_file(folder) if self.target_is_sharded else os.path.join(folder, ckpt.TARGET_FILE)
            if not os.path.exists(path):
                raise SqlmError(f"checkpoint {folder} has no {os.path.basename(path)}; it was saved without a target "
                                "network (or by another number of processes)")
            from safetensors.torch import load_file

            self.load_target_state_dict(load_file(path), f"checkpoint {folder}")
        counters = ckpt.load_aux_state(folder, replay_buffer=self.replay_buffer, process_index=self.args.process_index)
        if counters:
            self._mix_credit = float(counters.get("mix_credit", 0.0))
            self._skipped_steps = int(counters.get("skipped_steps", 0))


def _is_peft(model) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover
        return False
    return isinstance(model, PeftModel)
