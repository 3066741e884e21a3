"""SoftQTrainer: a ``transformers.Trainer`` that fits a causal LM with the path-consistency losses.

Per optimizer step:

1. ``get_batch_samples`` turns the dataset rows of every gradient-accumulation micro-batch into
   packed batches (:class:`sqlm.batching.BatchBuilder`: offline completions, online rollouts of the
   current policy, replayed samples, scored into per-token rewards ``r[t]``); it also counts the
   normaliser of the loss over the whole optimizer batch (all micro-batches and all processes), so
   gradient accumulation and data parallelism give the gradient of one big batch.
2. ``compute_loss`` reads the model through ``sqlm.forward`` (Q, V, log pi of the taken tokens), the
   reference's ``log pi_ref`` (:mod:`sqlm.reference`) and the target network's ``V_bar`` (:mod:`sqlm.target`),
   and calls the loss's entry of ``sqlm.losses.LOSS_SPECS``, reduced by ``sqlm.losses.normaliser``;
   the batch's metrics (:mod:`sqlm.train_metrics`) are logged averaged over processes.
3. :class:`sqlm.nonfinite.NonFiniteCallback` acts on a NaN/inf of the step before the optimizer sees it;
   :class:`sqlm.target.TargetNetworkCallback` moves the target network towards the policy after the
   step (Polyak averaging), never inside ``compute_loss``.
"""

from __future__ import annotations

import functools
import os
import time

import torch
from transformers import PreTrainedTokenizerBase, Trainer, TrainerCallback, set_seed
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from . import checkpoint as ckpt
from .batching import BatchBuilder, GroupRepeatSampler, eos_token_ids
from .checkpoint import mark_complete
from .config import SoftQConfig
from .data import DataCollatorForSoftQ, prepare_dataset
from .engine import check_engine_enabled, engine_shards, prepare_frozen
from .errors import SqlmError
from .forward import attach_value_head, policy_soft_outputs
from .losses import loss_spec, normaliser, reduced_sum
from .nonfinite import NonFiniteCallback
from .reference import Reference, anchor_to_reference
from .rewards import setup as reward_setup
from .rewards.registry import resolve_rewarders
from .rollout import ReplayBuffer, generate_completions, generate_completions_vllm, vllm_generation
from .target import TargetNetworkCallback, build_target, is_peft
from .train_metrics import LOSS_STATS, StepMetrics, policy_metrics


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
        """The components are set up in this order, each reading what the ones before made:

        1. models and tokenizer; 2. ``bradley_terry`` fits its reward model from the initial policy;
        3. the reference (a copy of the initial policy, without adapter or value head); 4. PEFT;
        5. the target network (an adapter of the PEFT policy, or a copy of it without value head);
        6. the value head, dropout off; 7. the rewarders, whose model-based dense rewards are cached as
        columns of the raw rows; 8. the data, tokenised; 9. the reference's precomputed columns, read
        from the policy before its first step; 10. ``Trainer.__init__``; 11. the reference and target
        models prepared for the engine; 12. the state of the steps (batches, NaN guard, metrics)."""
        if args is None:
            args = SoftQConfig(output_dir="sqlm-output")
        if not isinstance(args, SoftQConfig):
            raise TypeError(f"args must be a SoftQConfig, got {type(args).__name__}")
        if train_dataset is None:
            raise SqlmError("SoftQTrainer needs a train_dataset")
        set_seed(args.seed)

        model, ref_model, processing_class = self._setup_models(model, ref_model, processing_class, args)
        reward_funcs, reward_kwargs, report = reward_setup.bradley_terry(
            model, processing_class, train_dataset, args, reward_funcs
        )
        self.auto_reward_report = report
        self._first_log = reward_setup.bradley_terry_log(report)  # logged once, in the first log
        explicit_ref = ref_model is not None
        self.reference = Reference.build(model, ref_model, args, peft=peft_config is not None or is_peft(model))
        model = self._setup_policy(model, peft_config, args)
        train_dataset, offline_only = self._setup_rewards(
            processing_class, train_dataset, args, reward_funcs, reward_kwargs, reward_search_dirs, explicit_ref
        )
        train_dataset, eval_dataset = self._setup_data(train_dataset, eval_dataset, processing_class, args)
        train_dataset, eval_dataset = self.reference.precompute(
            model, train_dataset, eval_dataset, args, processing_class.pad_token_id
        )

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

        check_engine_enabled(self)
        prepare = functools.partial(prepare_frozen, self)
        self.reference.prepare(prepare)
        self.target.prepare(prepare, self.model, engine_shards(self))
        if self.target:
            self.add_callback(TargetNetworkCallback(self))
        self._setup_steps(processing_class, offline_only)
        if hasattr(self.model, "add_model_tags"):
            self.model.add_model_tags(self._tag_names)

    # ------------------------------------------------------------------ setup

    @staticmethod
    def _setup_models(model, ref_model, processing_class, args: SoftQConfig):
        """``(model, ref_model, tokenizer)``: models given by name loaded (safetensors only; remote code
        only when asked), the reference named by ``ref_model_name_or_path`` too, and the tokenizer
        (default: the model's own), whose pad token the model then uses."""
        from .loading import load_model, load_tokenizer, model_init_kwargs

        init_kwargs = model_init_kwargs(args)
        if isinstance(model, str):
            model = load_model(model, init_kwargs)
        if isinstance(ref_model, str):
            ref_model = load_model(ref_model, init_kwargs)
        elif ref_model is None and args.use_reference and args.ref_model_name_or_path:
            ref_model = load_model(args.ref_model_name_or_path, init_kwargs)
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
        return model, ref_model, processing_class

    def _setup_policy(self, model, peft_config, args: SoftQConfig):
        """The policy as it trains, and the target network (``self.target``) made from it: PEFT's adapter
        first (the target is then a second adapter of it), the target before the value head (a copy
        has none); dropout off in every model."""
        from trl.trainer.utils import disable_dropout_in_model

        if peft_config is not None:
            from peft import get_peft_model

            if is_peft(model):
                raise SqlmError("model already has a PEFT adapter; pass its base model with peft_config")
            model = get_peft_model(model, peft_config)
        self.target = build_target(model, args)
        if args.uses_value_head:
            attach_value_head(model)
        if args.disable_dropout:
            for m in (model, self.reference.model, self.target.model):
                if m is not None:
                    disable_dropout_in_model(m)
        return model

    def _setup_rewards(self, tokenizer, train_dataset, args, reward_funcs, reward_kwargs, search_dirs, explicit_ref):
        """The rewarders (``self.rewarders`` and their weights) and ``(train_dataset, offline_only)``: the
        raw rows with the model-based rewarders' dense rewards cached as columns, and the rewarders that
        then score online samples only (:mod:`sqlm.rewards.setup`)."""
        self.rewarders, self.reward_weights = resolve_rewarders(
            args, tokenizer, reward_funcs, search_dirs=search_dirs or (), reward_kwargs=reward_kwargs
        )
        self._no_reward_signal = reward_setup.has_no_reward_signal(self.rewarders, train_dataset, args, explicit_ref)
        return reward_setup.cache_dense_rewards(train_dataset, tokenizer, args, self.rewarders, self.reward_weights)

    @staticmethod
    def _setup_data(train_dataset, eval_dataset, tokenizer, args: SoftQConfig):
        """The datasets tokenised (:func:`sqlm.data.prepare_dataset`) unless they already are."""
        if hasattr(train_dataset, "column_names") and "prompt_ids" not in train_dataset.column_names:
            train_dataset = prepare_dataset(train_dataset, tokenizer, args, name="train")
        if eval_dataset is not None and "prompt_ids" not in eval_dataset.column_names:
            eval_dataset = prepare_dataset(eval_dataset, tokenizer, args, name="eval")
        return train_dataset, eval_dataset

    def _setup_steps(self, tokenizer, offline_only: set[int]) -> None:
        """What the steps keep: EOS ids, the NaN guard, metrics, counters, the vLLM generator and the
        batch builder with its replay buffer."""
        self.eos_token_ids = eos_token_ids(self.model, tokenizer)
        self.pad_token_id = tokenizer.pad_token_id
        self.replay_buffer = ReplayBuffer(self.args.replay_buffer_size, seed=self.args.seed + self.args.process_index,
                                          priority=self.args.replay_priority)  # fmt: skip
        self.generated_completions = self.generated_tokens = 0  # generated for training (all rollouts)
        self._reused: list[dict] | None = None  # num_iterations > 1: the batches of the current cycle
        self._rng_pending: str | None = None  # checkpoint whose RNG state is restored before the next batch
        self.nonfinite = NonFiniteCallback(self)
        self.add_callback(self.nonfinite)
        self._metrics = StepMetrics()
        # vLLM rollouts (use_vllm, checked in SoftQConfig): weights pushed before the first rollout of each step
        self.vllm_generation = vllm_generation(self) if self.args.use_vllm else None
        self._vllm_synced_step = -1
        self.batches = BatchBuilder(
            self.args, tokenizer, self.rewarders, self.reward_weights, self.eos_token_ids, self.replay_buffer,
            generate=self._generate, on_nonfinite=self.nonfinite.found, offline_only=offline_only
        )  # fmt: skip

    # ------------------------------------------------------------------ reference and target network

    @property
    def ref_model(self):
        """The reference model of its own (explicit, or a frozen copy of the initial policy), or None."""
        return self.reference.model

    @property
    def target_model(self):
        """The target network as a separate model (a frozen copy), or None (a PEFT adapter, or none)."""
        return self.target.model

    @property
    def has_target(self) -> bool:
        """A target network is kept: a frozen copy (``target_model``) or, with PEFT, the adapter ``target``."""
        return bool(self.target)

    def update_target_model(self) -> None:
        """Polyak step of the target network towards the policy (the TargetNetworkCallback calls it);
        with a target adapter only the adapter weights move."""
        self.target.update(self.accelerator.unwrap_model(self.model), self.args.target_model_mixup_alpha)

    def target_values(self, model, inputs, with_log_pi: bool = False):
        """``V_bar(s_t)`` of the target network ``[N, T]`` (no grad), or None without one; with
        ``with_log_pi`` the pair ``(V_bar, log pi_bar(a_t|s_t))`` (see :meth:`sqlm.target.TargetNetwork.values`)."""
        return self.target.values(self._unwrapped(model), inputs, self.args.tau, with_log_pi)

    def reference_log_pi(self, model, inputs, return_lse: bool = False):
        """``log pi_ref(a_t|s_t)`` ``[N, T]`` (with ``return_lse`` also ``logsumexp z_ref(s_t)``), or None
        without a reference (see :meth:`sqlm.reference.Reference.log_pi`)."""
        return self.reference.log_pi(self._unwrapped(model), inputs, return_lse)

    def _unwrapped(self, model):
        """``model`` without the engine's wrappers, looked up once per wrapper object: accelerate's
        ``unwrap_model`` reads installed package metadata at every call (about 0.5 ms, twice a step)."""
        cached = getattr(self, "_unwrap_cache", None)
        if cached is None or cached[0] is not model:
            self._unwrap_cache = cached = (model, self.accelerator.unwrap_model(model))
        return cached[1]

    # ------------------------------------------------------------------ batches

    def _get_train_sampler(self, train_dataset=None):
        """Online and mixed modes count completions, as TRL's GRPO: every prompt is drawn
        ``num_generations`` times in a row (see :class:`sqlm.batching.GroupRepeatSampler`)."""
        if self.args.mode == "offline":
            return super()._get_train_sampler(train_dataset)
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        a = self.args
        prompts_per_step = a.per_device_train_batch_size * a.gradient_accumulation_steps * a.world_size
        if a.num_iterations > 1 and len(dataset) < prompts_per_step // a.num_generations:
            raise SqlmError(f"key 'num_iterations': one step takes {prompts_per_step // a.num_generations} prompts, "
                            f"the dataset has {len(dataset)}")  # fmt: skip
        return GroupRepeatSampler(len(dataset), a.num_generations, shuffle=True, seed=a.seed,
                                  batch_size=prompts_per_step // a.num_generations, repeat_count=a.num_iterations)  # fmt: skip

    def _get_eval_sampler(self, eval_dataset):
        if self.args.mode != "online":  # mixed mode evaluates on the offline completions
            return super()._get_eval_sampler(eval_dataset)
        return GroupRepeatSampler(len(eval_dataset), self.args.num_generations, shuffle=False)

    def _generate(self, prompts: list[list[int]], train: bool = True) -> list[list[int]]:
        """One completion of the current policy per prompt (vLLM with ``use_vllm``, else HF generate);
        logs which generator ran and how fast (with the training or the evaluation metrics, as
        ``train`` says: the model may still be in eval mode when the first training batch is built)."""
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
        return completions

    def build_batch(self, examples: list[dict], train: bool = True) -> dict:
        """Trajectories of some dataset rows (offline, online, replayed), scored and packed."""
        return self.batches.build(examples, train)

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """Build every micro-batch of the optimizer step and count the loss normaliser over all of
        them and all processes (so accumulation and data parallelism match one big batch)."""
        raw, _ = super().get_batch_samples(epoch_iterator, num_batches, device)
        self.nonfinite.begin_step()
        if self._rng_pending is not None:
            # resuming: the checkpoint's RNG state must be in place before rollouts sample from it
            # (the Trainer itself restores it only after this method has run)
            self._load_rng_state(self._rng_pending)
        batches = self._step_batches(raw)
        if not batches:
            return batches, None
        total = sum(normaliser(b["path_mask"], self.args.reduction) for b in batches).float().to(self.args.device)
        if self.args.world_size > 1:
            total = self.accelerator.gather(total.reshape(1)).sum()
        return batches, total

    def _step_batches(self, raw: list[dict]) -> list[dict]:
        """The packed micro-batches of this optimizer step: built from ``raw`` (generating and scoring),
        or, with ``num_iterations > 1``, the ones built at the step that started this cycle (the sampler
        gave the same prompts again). A reused batch is no longer the current policy's sample, so it
        carries no ``on_policy`` mask (its KL estimate would be biased)."""
        k = self.args.num_iterations
        if k > 1 and self._reused is not None and self.state.global_step % k != 0:
            return [{key: v for key, v in b.items() if key != "on_policy"} for b in self._reused]
        batches = [self.build_batch(b["examples"], train=True) for b in raw]
        self._reused = [dict(b) for b in batches] if k > 1 else None
        return batches

    # ------------------------------------------------------------------ loss

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
            soft, target_v = anchor_to_reference(soft, target_v, ref_lse, mask, args.tau)

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
            group_scale=args.group_scale,
        )
        loss = self._reduce(per_step, mask, num_items_in_batch)
        if mode == "train":  # a non-finite loss: name its first non-finite input
            inputs_by_name = {
                "reward": rewards,
                "value V(s) of the policy": soft.v,
                "Q(s, a) of the policy": soft.q,
                "log pi(a|s) of the policy": soft.log_pi,
                "log pi_ref(a|s) of the reference model": ref_log_pi,
                "value V_bar(s) of the target network": target_v,
                "value V_phi(s) of the value head": head_v,
            }
            self.nonfinite.check_loss(loss, mask, inputs_by_name)

        with torch.no_grad():
            model_side = policy_metrics(
                soft.log_pi.detach(), ref_log_pi, mask, args.tau, inputs.get("pair_index"), inputs.get("on_policy")
            )
        self._metrics.add(mode, model_side)
        # the loss's own statistics (its reward / length duplicate the batch's keys below)
        self._metrics.add(mode, {k: stats[k] for k in LOSS_STATS if k in stats})
        self._metrics.add(mode, inputs.get("sqlm_metrics") or {})
        return (loss, {"per_step_loss": per_step}) if return_outputs else loss

    def _reduce(self, per_step: torch.Tensor, mask: torch.Tensor, num_items_in_batch=None) -> torch.Tensor:
        """The per-step losses reduced as ``args.reduction`` says, over the normaliser of the whole optimizer
        batch (get_batch_samples) or else of this batch."""
        args = self.args
        total = normaliser(mask, args.reduction) if num_items_in_batch is None else num_items_in_batch
        numerator = reduced_sum(per_step, mask, args.reduction)
        loss = numerator / torch.as_tensor(total, device=numerator.device).clamp(min=1.0)
        if num_items_in_batch is not None and args.world_size > 1:  # DDP averages gradients over processes
            loss = loss * args.world_size
        return loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        batch = self._prepare_inputs(self.build_batch(inputs["examples"], train=False))
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, batch)
        return loss.detach(), None, None

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if self.model.training else "eval"
        metrics = self._metrics.averaged(mode, self.args.world_size)
        if mode == "eval":
            metrics = {f"eval_{k}": v for k, v in metrics.items()}
        logs.update(metrics)
        if mode == "train" and self.nonfinite.skipped_steps:
            logs["nonfinite/skipped_steps"] = self.nonfinite.skipped_steps
        if mode == "train" and self._first_log:  # once, in the first log
            logs.update(self._first_log)
            self._first_log = {}
        super().log(logs, start_time)

    # ------------------------------------------------------------------ checkpoints

    def train(self, resume_from_checkpoint: str | bool | None = None, trial=None, ignore_keys_for_eval=None, **kwargs):
        """``Trainer.train``, resuming only from complete checkpoints: ``True`` / ``"latest"`` picks the
        newest complete one of ``output_dir`` (a folder half-written by a killed run is skipped), a
        path must be complete (see :mod:`sqlm.checkpoint`)."""
        if self._no_reward_signal:
            raise SqlmError(reward_setup.no_reward_message(self.args.mode))
        folder = ckpt.resolve_resume(resume_from_checkpoint, self.args.output_dir)
        self._rng_pending = folder
        return super().train(
            resume_from_checkpoint=folder, trial=trial, ignore_keys_for_eval=ignore_keys_for_eval, **kwargs
        )

    def _load_rng_state(self, checkpoint):  # once per resume, before its first batch is built (get_batch_samples)
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
        the policy adapter is written (see :meth:`sqlm.target.TargetNetwork.policy_only_saved`)."""
        with self.target.policy_only_saved(self.accelerator.unwrap_model(self.model)):
            return super()._save(output_dir, state_dict)

    def save_aux_state(self, folder: str) -> None:
        """Save what the HF checkpoint lacks into ``folder``: this process's replay buffer and the
        mixed-mode credit / skip count (JSON; no pickles), and the target network (safetensors: a copy,
        an adapter, or this process's shards of a sharded one)."""
        ckpt.save_aux_state(
            folder,
            replay_buffer=self.replay_buffer,
            process_index=self.args.process_index,
            is_main=self.args.should_save,
            counters={
                "mix_credit": self.batches.mix_credit,
                "skipped_steps": self.nonfinite.skipped_steps,
                "generated_completions": self.generated_completions,
                "generated_tokens": self.generated_tokens,
            },
        )
        policy = self.accelerator.unwrap_model(self.model)
        self.target.save(folder, policy, self.args.process_index, self.args.should_save)

    def _load_optimizer_and_scheduler(self, checkpoint):
        with ckpt.tensors_only(checkpoint):
            super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is not None:
            self.load_aux_state(checkpoint)

    def load_aux_state(self, folder: str) -> None:
        """Restore the target network, replay buffer and trainer counters saved by :meth:`save_aux_state`."""
        self.target.load(folder, self.accelerator.unwrap_model(self.model), self.args.process_index)
        counters = ckpt.load_aux_state(folder, replay_buffer=self.replay_buffer, process_index=self.args.process_index)
        if counters:
            self.batches.mix_credit = float(counters.get("mix_credit", 0.0))
            self.nonfinite.skipped_steps = int(counters.get("skipped_steps", 0))
            self.generated_completions = int(counters.get("generated_completions", 0))
            self.generated_tokens = int(counters.get("generated_tokens", 0))
