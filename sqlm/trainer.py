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
import functools
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

from . import checkpoint as ckpt
from .checkpoint import mark_complete
from .config import SoftQConfig
from .data import (
    DataCollatorForSoftQ,
    Trajectory,
    _passthrough_columns,
    offline_trajectories,
    pack_trajectories,
    prepare_dataset,
)
from .errors import SqlmError
from .forward import (
    TARGET_ADAPTER,
    VALUE_HEAD_ATTR,
    adapter_active,
    add_target_adapter,
    attach_value_head,
    drop_gathered,
    is_zero3_partitioned,
    local_shard,
    model_log_pi,
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
from .soft import SoftOutputs, fold_rewards_into_path, path_mask


logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- target network


def frozen_copy(model: nn.Module) -> nn.Module:
    """A copy of the initial policy, for the reference or the target network.

    Under accelerate's ZeRO-3, transformers partitions every model loaded once the training arguments
    exist (``zero.Init``; accelerate registers the DeepSpeed config with transformers whatever
    ``zero3_init_flag`` says), so the policy of ``sqlm train`` holds only its own partition of each
    parameter (``ds_tensor``; ``p.data`` is empty): a deepcopy would copy empty parameters without
    their partitions. The copy is then built from the policy's config under
    ``zero.Init`` (``_from_config``: partitioned the same way) and takes the policy's partitions piece
    by piece, with no gather of whole parameters; buffers (not partitioned) are copied as they are."""
    if not is_zero3_partitioned(model):
        return copy.deepcopy(model)
    from transformers.integrations import is_deepspeed_zero3_enabled

    if not is_deepspeed_zero3_enabled():
        raise SqlmError(
            "the model is partitioned by DeepSpeed ZeRO-3 but no ZeRO-3 config is active: create the "
            "SoftQConfig (or TrainingArguments) before loading the model under ZeRO-3"
        )
    dtype = next(model.parameters()).ds_tensor.dtype
    clone = type(model)._from_config(copy.deepcopy(model.config), dtype=dtype)
    polyak_update(model, clone, 1.0, names=[n for n, _ in clone.named_parameters()])
    buffers = dict(model.named_buffers())
    with torch.no_grad():
        for n, b in clone.named_buffers():
            if n in buffers:
                b.copy_(buffers[n])
    return clone


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
        if t.target_model is not None and t.target_is_sharded and not t._target_loaded:
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

        # reward_funcs: [bradley_terry] fits its reward model from the initial policy (before PEFT)
        reward_funcs, reward_kwargs = self._auto_reward(model, processing_class, train_dataset, args, reward_funcs)
        explicit_ref = ref_model is not None

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
                ref_model = frozen_copy(model)

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
                self.target_model = frozen_copy(model)
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
            args, processing_class, reward_funcs, search_dirs=reward_search_dirs or (), reward_kwargs=reward_kwargs
        )
        # no reward, and the reference is the initial policy: the soft optimum is that policy itself
        self._no_reward_signal = (
            not self.rewarders
            and not data_has_rewards(train_dataset, args)
            and args.use_reference
            and not explicit_ref
            and not args.ref_model_name_or_path
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
            train_dataset = self._precompute_reference(
                reader, train_dataset, args, pad, args.per_device_train_batch_size
            )
            if eval_dataset is not None:
                eval_dataset = self._precompute_reference(
                    reader, eval_dataset, args, pad, args.per_device_eval_batch_size
                )
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

        self._check_engine_enabled()
        self.ref_model = self._prepare_aux(ref_model)
        self.target_model = self._prepare_aux(self.target_model)
        if self.target_model is not None:
            self._target_names = _trainable_names(self.model)
        if self.has_target:
            self.add_callback(TargetNetworkCallback(self))

        tok = processing_class
        eos = (
            getattr(self.model.generation_config, "eos_token_id", None)
            if hasattr(self.model, "generation_config")
            else None
        )
        eos = eos if eos is not None else tok.eos_token_id
        self.eos_token_ids = [eos] if isinstance(eos, int) else [e for e in (eos or []) if e is not None]
        if tok.eos_token_id is not None and tok.eos_token_id not in self.eos_token_ids:
            self.eos_token_ids.append(tok.eos_token_id)
        self.pad_token_id = tok.pad_token_id
        self.replay_buffer = ReplayBuffer(args.replay_buffer_size, seed=args.seed + self.args.process_index)
        self._mix_credit = 0.0
        self.generated_completions = 0  # completions and tokens generated for training (all rollouts)
        self.generated_tokens = 0
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

    def _auto_reward(self, model, tokenizer, train_dataset, args, reward_funcs):
        """``(reward_funcs, reward_kwargs)`` with ``bradley_terry`` replaced by the token rewarder on a
        reward model fitted on the training pairs (:mod:`sqlm.rewards.auto`); its held-out accuracy
        goes into the first log."""
        from .rewards.auto import AUTO_REWARD, bradley_terry_rewarder

        self._auto_reward_log: dict[str, float] = {}
        funcs = args.reward_funcs if reward_funcs is None else reward_funcs
        funcs = list(funcs) if isinstance(funcs, (list, tuple)) else ([] if funcs is None else [funcs])
        if AUTO_REWARD not in funcs:
            return reward_funcs, None
        cache_root = args.reward_cache_dir or sqlm_cache_dir("rewards")
        rewarder, report = bradley_terry_rewarder(model, tokenizer, train_dataset, args, cache_root)
        how = "fitted" if report["fitted"] else "from the cache"
        if args.should_log:
            print(
                f"{AUTO_REWARD} reward model ({how}, {report['path']}): held-out accuracy "
                f"{report['eval_accuracy']:.3f} on {report['eval_pairs']} pairs it was not fitted on"
            )
        self._auto_reward_log = {"reward_model/eval_accuracy": report["eval_accuracy"],
                                 "reward_model/eval_pairs": report["eval_pairs"]}  # fmt: skip
        self.auto_reward_report = report
        kwargs = {k: v for k, v in (args.reward_kwargs or {}).items() if k != AUTO_REWARD}
        return [rewarder if f == AUTO_REWARD else f for f in funcs], kwargs

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
                dataset,
                ref_fn,
                ref_fingerprint=reference_fingerprint(reader, skip_adapters=peft_base),
                pad_token_id=pad_token_id,
                batch_size=args.precompute_ref_batch_size or batch_size,
                precision=precision,
                cache_dir=sqlm_cache_dir("reference"),
                device=device,
            )

    def _check_engine_enabled(self) -> None:
        """The engine the launch asks for (accelerate config, ``deepspeed`` / ``fsdp`` keys) is the one that
        runs: accelerate turns FSDP on only for accelerator devices (CUDA, XPU, ...), and otherwise trains
        unsharded without a word (e.g. on CPU processes, or without a launcher)."""
        engine = self.args.sharding_engine()
        if engine is None:
            return
        kind, level = engine
        if self.is_deepspeed_enabled if kind == "deepspeed" else self.is_fsdp_enabled:
            return
        name = f"DeepSpeed ZeRO-{level}" if kind == "deepspeed" else f"FSDP{level}"
        why = "" if kind == "deepspeed" else "; accelerate enables FSDP only on GPUs or other accelerators"
        raise SqlmError(
            f"the launch asks for {name}, but accelerate runs it unsharded (distributed type "
            f"{self.accelerator.distributed_type.value}{why}): launch with recipes/accelerate/ddp.yaml instead"
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
        """The target network is sharded by ZeRO-3 or FSDP, as a separate model or as the target adapter of
        the sharded policy: each process holds (and saves) only its own pieces."""
        if not self.has_target:
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

    def target_values(self, model, inputs, with_log_pi: bool = False):
        """``V_bar(s_t)`` of the target network ``[N, T]`` (no grad), or None without one; with
        ``with_log_pi`` the pair ``(V_bar, log pi_bar(a_t|s_t))`` (Guo et al.'s reversed terms read the
        target's advantage ``tau log pi_bar``). A target adapter is made active for this forward (eval
        mode); the policy adapter comes back after."""
        if self.target_model is None and self._target_pairs is None:
            return (None, None) if with_log_pi else None
        if self.target_model is not None:
            scope = contextlib.nullcontext(self.target_model)
        else:
            scope = adapter_active(self.accelerator.unwrap_model(model), TARGET_ADAPTER)
        with scope as net:
            log_pi, lse = model_log_pi(net, inputs, return_lse=True)
        values = self.args.tau * lse
        return (values, log_pi) if with_log_pi else values

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
                raise SqlmError(
                    f"{where}: target parameter '{n}' was saved with shape {tuple(t.shape)}, this process "
                    f"holds {tuple(piece.shape)} (a sharded checkpoint resumes on the same number of processes)"
                )
            piece.copy_(t.to(piece.device, piece.dtype))
            drop_gathered(params[n])
        self._target_loaded = True

    # ------------------------------------------------------------------ trajectories

    def _get_train_sampler(self, train_dataset=None):
        """Online and mixed modes count completions, as TRL's GRPO: every prompt is drawn
        ``num_generations`` times in a row (see :class:`GroupRepeatSampler`)."""
        if self.args.mode == "offline":
            return super()._get_train_sampler(train_dataset)
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        return GroupRepeatSampler(len(dataset), self.args.num_generations, shuffle=True, seed=self.args.seed)

    def _get_eval_sampler(self, eval_dataset):
        if self.args.mode != "online":  # mixed mode evaluates on the offline completions
            return super()._get_eval_sampler(eval_dataset)
        return GroupRepeatSampler(len(eval_dataset), self.args.num_generations, shuffle=False)

    def _n_online(self, n_groups: int) -> int:
        """Mixed mode: how many of this batch's prompt groups are rolled out (a carried credit of
        ``mix_ratio`` per group, so the share is exact over the run)."""
        self._mix_credit += self.args.mix_ratio * n_groups
        k = min(n_groups, int(math.floor(self._mix_credit + 1e-9)))
        self._mix_credit -= k
        return k

    def _rollout(self, rows: list[dict[str, Any]], train: bool = True) -> list[Trajectory]:
        """One completion of the current policy per row (the sampler repeats each prompt
        ``num_generations`` times; vLLM with ``use_vllm``, else HF generate) and log which generator
        ran and how fast (with the training or the evaluation metrics, as ``train`` says: the model
        may still be in eval mode when the first training batch is built)."""
        from trl.data_utils import is_conversational

        prompts = [r["prompt_ids"] for r in rows]
        started = time.perf_counter()
        if self.vllm_generation is not None:
            if self.state.global_step != self._vllm_synced_step:  # the policy moved since the last push
                self.vllm_generation.sync_weights()
                self._vllm_synced_step = self.state.global_step
            # one completion per entry: a prompt's group may span micro-batches (GRPO's global check)
            completions = generate_completions_vllm(self.vllm_generation, prompts, 1, self.eos_token_ids)
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
        if train:  # what training generated (run_stats.json of `sqlm train`)
            self.generated_completions += len(completions)
            self.generated_tokens += sum(map(len, completions))
        metrics = self._metrics["train" if train else "eval"]
        metrics[f"generation/{generator}/seconds"].append(seconds)
        metrics[f"generation/{generator}/tokens_per_second"].append(sum(map(len, completions)) / max(seconds, 1e-9))
        out = []
        for row, ids in zip(rows, completions):
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

    def _split_batch(self, examples: list[dict[str, Any]], train: bool) -> tuple[list[dict], list[dict]]:
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
        k = self._n_online(len(groups))
        return [r for g in groups[:k] for r in g], [g[0] for g in groups[k:]]

    def build_batch(self, examples: list[dict[str, Any]], train: bool = True) -> dict[str, Any]:
        """Trajectories of some dataset rows (offline, online, replayed), scored and packed."""
        args = self.args
        gen_rows, offline_rows = self._split_batch(examples, train)
        trajs: list[Trajectory] = []
        for ex in offline_rows:
            trajs += offline_trajectories(ex, args.chosen_score_column, args.rejected_score_column)
        fresh: list[Trajectory] = self._rollout(gen_rows, train) if gen_rows else []
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
        batch["group_ids"] = prompt_groups(all_trajs)
        if fresh and self._samples_policy():
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

    def _samples_policy(self) -> bool:
        """Online samples come from pi itself (not a tempered or truncated version of it)."""
        a = self.args
        return a.temperature == 1.0 and a.top_p == 1.0 and not a.top_k

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
                raise SqlmError(
                    "a batch has rows without precomputed reference log-probs (precompute_ref_log_probs) "
                    "and no reference model is loaded"
                )
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
        target_v, target_log_pi = self.target_values(model, inputs, with_log_pi=True)
        if not spec.needs_target_log_pi:
            target_log_pi = None
        if args.value_anchor == "reference" and ref_lse is not None and not spec.needs_value_head:
            # values measured from the reference's logsumexp: pi is unchanged, V = 0 where pi = pi_ref
            anchor = args.tau * ref_lse * mask
            soft = SoftOutputs(q=soft.q - anchor, v=soft.v - anchor, log_pi=soft.log_pi, entropy=soft.entropy)
            if target_v is not None:
                target_v = target_v - anchor

        per_step, stats = spec(
            soft,
            rewards,
            mask,
            value=head_v,
            target_v=target_v,
            target_log_pi=target_log_pi,
            coefficient=args.guo_coefficient,
            d=args.rollout_length,
            tau=args.tau,
            gamma=args.gamma,
            ref_log_pi=ref_log_pi,
            reduction="none",
            group=inputs.get("group_ids"),
        )
        # the normaliser of the whole optimizer batch (get_batch_samples), else of this batch alone
        total = normaliser(mask, args.reduction) if num_items_in_batch is None else num_items_in_batch
        numerator = reduced_sum(per_step, mask, args.reduction)
        loss = numerator / torch.as_tensor(total, device=numerator.device).clamp(min=1.0)
        if num_items_in_batch is not None and args.world_size > 1:  # DDP averages gradients over processes
            loss = loss * args.world_size

        if mode == "train" and not bool(torch.isfinite(loss.detach())):
            if self._nonfinite is None:  # name the first non-finite input of the loss
                self._nonfinite = (
                    nonfinite_value_source(
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
                    )
                    or "loss"
                )

        metrics = self._metrics[mode]
        with torch.no_grad():
            model_side = policy_metrics(
                soft.log_pi.detach(), ref_log_pi, mask, args.tau, inputs.get("pair_index"), inputs.get("on_policy")
            )
        for k, v in model_side.items():
            metrics[k].append(v)
        for k in LOSS_STATS:  # the loss's own statistics (its reward / length duplicate the keys below)
            if k in stats:
                metrics[k].append(stats[k])
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
        metrics = {k: sum(v) / len(v) for k, v in local.items() if v}
        if mode == "eval":
            metrics = {f"eval_{k}": v for k, v in metrics.items()}
        logs.update(metrics)
        if mode == "train" and self._skipped_steps:
            logs["nonfinite/skipped_steps"] = self._skipped_steps
        if mode == "train" and self._auto_reward_log:  # once, in the first log
            logs.update(self._auto_reward_log)
            self._auto_reward_log = {}
        super().log(logs, start_time)
        self._metrics[mode].clear()

    # ------------------------------------------------------------------ checkpoints

    def train(self, resume_from_checkpoint: str | bool | None = None, trial=None, ignore_keys_for_eval=None, **kwargs):
        """``Trainer.train``, resuming only from complete checkpoints: ``True`` / ``"latest"`` picks the
        newest complete one of ``output_dir`` (a folder half-written by a killed run is skipped), a
        path must be complete (see :mod:`sqlm.checkpoint`)."""
        if self._no_reward_signal:
            raise SqlmError(no_reward_message(self.args.mode))
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

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        """``Trainer._save`` (the model of the output_dir and of every checkpoint); with a target adapter, only
        the policy adapter is written: PEFT would add the target as a ``target/`` adapter folder, which is
        not what a user loads. Checkpoints keep the target in ``target_model.safetensors`` (resume reads it)."""
        if self._target_pairs is None:
            return super()._save(output_dir, state_dict)
        model = self.accelerator.unwrap_model(self.model)
        model.save_pretrained = functools.partial(model.save_pretrained, selected_adapters=[model.active_adapter])
        try:
            return super()._save(output_dir, state_dict)
        finally:
            del model.save_pretrained  # the class's method again

    def save_aux_state(self, folder: str) -> None:
        """Save what the HF checkpoint lacks into ``folder``: the target network (safetensors), this
        process's replay buffer and the mixed-mode credit / skip count (JSON; no pickles)."""
        ckpt.save_aux_state(
            folder,
            replay_buffer=self.replay_buffer,
            process_index=self.args.process_index,
            is_main=self.args.should_save,
            counters={
                "mix_credit": self._mix_credit,
                "skipped_steps": self._skipped_steps,
                "generated_completions": self.generated_completions,
                "generated_tokens": self.generated_tokens,
            },
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
            raise SqlmError(
                f"checkpoint {checkpoint}: refusing to load optimizer/scheduler state that holds "
                f"more than tensors (weights_only load failed: {msg})"
            ) from None
        if checkpoint is not None:
            self.load_aux_state(checkpoint)

    def load_aux_state(self, folder: str) -> None:
        """Restore the target network, replay buffer and trainer counters saved by :meth:`save_aux_state`."""
        if self.has_target:
            path = self._target_file(folder) if self.target_is_sharded else os.path.join(folder, ckpt.TARGET_FILE)
            if not os.path.exists(path):
                raise SqlmError(
                    f"checkpoint {folder} has no {os.path.basename(path)}; it was saved without a target "
                    "network (or by another number of processes)"
                )
            from safetensors.torch import load_file

            self.load_target_state_dict(load_file(path), f"checkpoint {folder}")
        counters = ckpt.load_aux_state(folder, replay_buffer=self.replay_buffer, process_index=self.args.process_index)
        if counters:
            self._mix_credit = float(counters.get("mix_credit", 0.0))
            self._skipped_steps = int(counters.get("skipped_steps", 0))
            self.generated_completions = int(counters.get("generated_completions", 0))
            self.generated_tokens = int(counters.get("generated_tokens", 0))


# ----------------------------------------------------------------------------- reward signal


def data_has_rewards(dataset, args) -> bool:
    """Whether the training rows carry rewards of their own for the paths sqlm trains on (online
    rollouts are scored by reward functions only)."""
    from .rewards.cache import ALL_COLUMNS

    if args.mode == "online":
        return False
    cols = set(getattr(dataset, "column_names", None) or [])
    named = {c for c in (args.chosen_score_column, args.rejected_score_column) if c}
    return bool(cols & ({"reward", "label", *ALL_COLUMNS} | named))


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


# ----------------------------------------------------------------------------- batches and metrics

LOSS_STATS = ("consistency", "v_start", "entropy")
"""Statistics of the loss (``sqlm.losses``) that are logged under their own names."""


class GroupRepeatSampler(torch.utils.data.Sampler):
    """Dataset indices, each repeated ``repeat`` times in a row (TRL GRPO's ``RepeatSampler`` with
    ``mini_repeat_count``): a batch of ``B`` indices holds ``B / num_generations`` prompts. Shuffled
    per epoch from ``seed + epoch`` (the same order after a resume)."""

    def __init__(self, n: int, repeat: int, shuffle: bool = True, seed: int = 0):
        self.n, self.repeat, self.shuffle, self.seed, self.epoch = n, repeat, shuffle, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = range(self.n)
        for i in order:
            for _ in range(self.repeat):
                yield i

    def __len__(self) -> int:
        return self.n * self.repeat


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


def _mean_std(values: list[float], prefix: str) -> dict[str, float]:
    t = torch.tensor(values, dtype=torch.float64)
    out = {f"{prefix}mean" if prefix.endswith("/") else prefix: float(t.mean())}
    std_key = f"{prefix}std" if prefix.endswith("/") else f"{prefix}_std"
    out[std_key] = float(t.std()) if len(values) > 1 else float("nan")  # sample std, as TRL's nanstd
    return out


def batch_metrics(
    trajectories: list[Trajectory],
    rewards: list[torch.Tensor],
    per_source: dict[str, list[float]],
    lengths: torch.Tensor,
    eos_token_ids: list[int],
    online: bool,
) -> dict[str, float]:
    """What a batch logs about its data (the README's metrics table): the summed reward of every
    path (GRPO's ``reward`` / ``reward_std``), per reward function (``rewards/<name>/mean|std``),
    per kind of path (``task_reward/<chosen|rejected|online|replay>``) and the lengths of the trained
    completions (GRPO's ``completions/*``)."""
    totals = [float(r.sum()) for r in rewards]
    out = _mean_std(totals, "reward")
    for name, vals in per_source.items():
        if name == "data":  # rewards the dataset's own rows carry (replayed paths carry their old totals)
            vals = [v for t, v in zip(trajectories, vals) if t.source not in ("online", "replay")]
        if vals:
            out.update(_mean_std(vals, f"rewards/{name}/"))
    by_source: dict[str, list[float]] = {}
    for t, total in zip(trajectories, totals):
        by_source.setdefault(t.source, []).append(total)
    for k, v in by_source.items():
        out[f"task_reward/{k}"] = sum(v) / len(v)
    eos = set(eos_token_ids)
    clipped = [not any(tok in eos for tok in t.completion_ids) for t in trajectories]
    out["completions/mean_length"] = float(lengths.mean())
    out["completions/min_length"] = float(lengths.min())
    out["completions/max_length"] = float(lengths.max())
    out["completions/clipped_ratio"] = sum(clipped) / len(clipped)
    if online:
        out["completions/online_fraction"] = len(by_source.get("online", [])) / len(trajectories)
    return out


def kl_k3(log_pi: torch.Tensor, ref_log_pi: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``[N]``: ``sum_t exp(r_t) - 1 - r_t`` with ``r_t = log pi_ref(a_t|s_t) - log pi(a_t|s_t)`` on the
    path ``mask`` (Schulman's k3, the per-token KL TRL's GRPO logs as ``kl``). Each term is >= 0, and on
    tokens drawn from pi its expectation is KL(pi || pi_ref) at that state, so on paths sampled from pi
    the sum estimates the sequence KL without bias and, unlike ``sum_t -r_t``, never goes negative."""
    r = (ref_log_pi.float() - log_pi.float()) * mask.float()  # 0 off the mask, where exp(0) - 1 - 0 = 0
    return (torch.expm1(r) - r).sum(-1)


def policy_metrics(
    log_pi: torch.Tensor,
    ref_log_pi: torch.Tensor | None,
    mask: torch.Tensor,
    tau: float,
    pair_index: torch.Tensor | None = None,
    on_policy: torch.Tensor | None = None,
) -> dict[str, float]:
    """What a batch logs about the policy (the README's metrics table), from ``log pi(a_t|s_t)`` and
    ``log pi_ref(a_t|s_t)`` ``[N, T]`` on the path ``mask``.

    With preference pairs (``pair_index`` ``[P, 2]``: rows of chosen and rejected), as TRL's DPO logs
    them with ``beta = tau``: ``logps/chosen|rejected`` (sum of log pi over the completion),
    ``rewards/chosen|rejected`` (the implicit reward ``tau * sum_t log pi/pi_ref``),
    ``rewards/margins`` (chosen minus rejected) and ``rewards/accuracies`` (share of pairs whose
    chosen implicit reward is higher). With a reference: ``log_ratio_ref``, the mean over paths of
    ``sum_t log pi/pi_ref`` (on offline paths this is no KL and may be negative), and on the paths
    sampled from pi itself (``on_policy`` ``[N]``) ``kl_ref``, the mean of :func:`kl_k3` (TRL GRPO's
    ``kl`` estimator, summed over each path): an unbiased estimate of the sequence KL(pi || pi_ref)
    that, unlike the mean log-ratio, is never negative."""
    m = mask.float()
    seq_logp = (log_pi.float() * m).sum(-1)
    out: dict[str, float] = {}
    if pair_index is not None and len(pair_index):
        c, r = pair_index[:, 0], pair_index[:, 1]
        out["logps/chosen"] = float(seq_logp[c].mean())
        out["logps/rejected"] = float(seq_logp[r].mean())
    if ref_log_pi is None:
        return out
    ratio = ((log_pi.float() - ref_log_pi.float()) * m).sum(-1)
    out["log_ratio_ref"] = float(ratio.mean())
    if on_policy is not None and bool(on_policy.any()):
        rows = on_policy.to(ratio.device)
        out["kl_ref"] = float(kl_k3(log_pi[rows], ref_log_pi[rows], m[rows]).mean())
    if pair_index is not None and len(pair_index):
        chosen, rejected = tau * ratio[c], tau * ratio[r]
        out["rewards/chosen"] = float(chosen.mean())
        out["rewards/rejected"] = float(rejected.mean())
        out["rewards/margins"] = float((chosen - rejected).mean())
        out["rewards/accuracies"] = float((chosen > rejected).float().mean())
    return out


def _is_peft(model) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover
        return False
    return isinstance(model, PeftModel)
