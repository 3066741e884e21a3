"""Configuration of ``sqlm train``: :class:`SoftQConfig` (a ``TrainingArguments``) and
:class:`ModelConfig` (TRL's, for the model, its dtype and LoRA).

Field names follow TRL wherever TRL has the same concept (``max_length``, ``max_prompt_length``,
``max_completion_length``, ``num_generations``, ``temperature``, ``model_init_kwargs``,
``disable_dropout``, ``dataset_name``...), so a TRL recipe reads the same. The soft-Q temperature
``tau`` is DPO's ``beta`` (``beta`` is accepted as its alias).
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass, field
from typing import Any

import trl
from transformers import TrainingArguments

from .data.holdout import check_hold_out
from .errors import SqlmError
from .losses import GROUP_SCALES, LOSS_SPECS
from .recipe import choice_error


# the choices of each key that has a fixed set: the field's help and its check read the same tuple
LOSS_TYPES = ("auto", *LOSS_SPECS)  # 'auto' is resolved in __post_init__, before the checks
TRAIN_REDUCTIONS = ("token", "sequence", "sequence_mean")  # sqlm.losses.REDUCTIONS less 'sum' and 'none'
MODES = ("offline", "online", "mixed")
VALUE_ANCHORS = ("reference", "none")
VLLM_MODES = ("colocate", "server")
NAN_POLICIES = ("stop", "skip")


def default_loss_type(mode: str, num_generations: int = 2) -> str:
    """``loss_type: auto``: ``group_pcl`` when the policy samples groups of its own completions (online,
    mixed, ``num_generations >= 2``), else ``unified_pcl``. On SmolLM2-135M-Instruct chat arithmetic (scripts/results/real/learning_speed)
    unified_pcl online reached 0.24 held-out accuracy after 30 steps (one seed), TRL GRPO 0.42-0.50 and
    group_pcl 0.39-0.45 (three seeds); offline, unified_pcl's per-position residuals give dense rewards their
    per-token credit, which group_pcl (a whole-path residual) cannot."""
    return "group_pcl" if mode != "offline" and num_generations >= 2 else "unified_pcl"


def accelerator_supports_bf16() -> bool:
    """Whether a CUDA GPU that supports bf16 is visible (the default of ``bf16``)."""
    import torch

    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def _accelerator_available() -> bool:
    import torch

    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None and hasattr(accelerator, "is_available"):
        return bool(accelerator.is_available())
    return torch.cuda.is_available()


def _vllm_available() -> bool:
    from trl.import_utils import is_vllm_available

    return is_vllm_available()


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def as_mapping(value: Any, name: str) -> dict | None:
    """A mapping key's value: a dict (YAML) or a JSON object string, as a dict (None stays None); any
    other value is a one-line error naming the key."""
    if value is None or isinstance(value, dict):
        return value
    if isinstance(value, str):
        try:
            out = json.loads(value)
        except json.JSONDecodeError as e:
            raise SqlmError(f"key '{name}' must be a mapping (YAML) or a JSON object string: {e}") from None
        if isinstance(out, dict):
            return out
    raise SqlmError(f"key '{name}' must be a mapping, got {type(value).__name__} {value!r}")


def _bad(key: str, msg: str) -> SqlmError:
    return SqlmError(f"key '{key}' {msg}")


def _finite_number(config: Any, key: str) -> float:
    """``config.key``, which must be a finite int or float (not a bool)."""
    value = getattr(config, key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _bad(key, f"must be a finite number, got {value!r}")
    return value


@dataclass
class SoftQConfig(TrainingArguments):
    """Arguments of :class:`sqlm.trainer.SoftQTrainer`: the loss, its target network and reference,
    where trajectories come from (offline data, online rollouts, both), rewards and data loading.

    Every other field is a ``transformers.TrainingArguments`` field. Defaults run on a CPU: bf16 is
    on only when a bf16-capable accelerator is present, gradient checkpointing is off.
    """

    # ------------------------------------------------------------------ loss
    loss_type: str = field(
        default="auto",
        metadata={
            "help": "Path-consistency loss (sqlm.losses.LOSS_SPECS). 'auto' (default): 'group_pcl' when the policy samples "
            "groups (num_generations >= 2) "
            "(mode online or mixed: on a real model it learned about as fast as TRL GRPO, where unified_pcl lagged far "
            "behind), "
            "'unified_pcl' offline (per-token credit from dense rewards). 'pcl' (value head), 'unified_pcl' (V from the "
            "logits), 'group_pcl' (each completion's whole-path residual against its prompt group's mean: V cancels), "
            "'tbrm' (each completion's whole-path residual from V(s_0) read from the logits: TBRM, Yuan et al. 2025), "
            "'soft_q' (one-step Bellman, target network), 'multistep_soft_q' (Q regressed on its d-step soft "
            "return, the target detached), 'advantage_pcl' (Guo et al. 2021 eq. 9), "
            "'multistep_pcl' (Guo et al. 2021 eq. 10), and Guo et al.'s forms with their reversed terms, mixed by "
            "guo_coefficient: 'advantage_pcl_mix' (their v2_v2r), 'multistep_pcl_mix' (v3_v3r), 'guo_pcl_mix' "
            "(v2_v2r_v3_v3r).",
            "choices": LOSS_TYPES,
        },
    )
    tau: float = field(
        default=0.1,
        metadata={"help": "Entropy / KL temperature tau > 0: Q = tau * logits. Equals DPO's beta."},
    )
    beta: float | None = field(
        default=None,
        metadata={"help": "TRL/DPO name for tau; when set it overrides tau."},
    )
    gamma: float = field(default=1.0, metadata={"help": "Discount gamma in (0, 1]."})
    rollout_length: int | None = field(
        default=None,
        metadata={
            "help": "Rollout length d of the path-consistency segments (pcl, unified_pcl, multistep_soft_q); None = "
            "to the end of the path."
        },
    )
    reduction: str = field(
        default="token",
        metadata={
            "help": "How per-step losses are averaged (see sqlm/losses.py): 'token' (every path step of the "
            "optimizer batch weighs the same), 'sequence' (sum over a path, mean over paths), "
            "'sequence_mean' (mean within a path, mean over paths). Normalised over the whole optimizer "
            "batch (all gradient-accumulation steps and processes).",
            "choices": TRAIN_REDUCTIONS,
        },
    )
    group_scale: str = field(
        default="none",
        metadata={
            "help": "group_pcl only: weigh each completion's squared group residual by 1/(tau*s), s the "
            "standard deviation of the rewards in its prompt group ('group', TRL GRPO's scale_rewards) or in "
            "the batch ('batch'), so its gradient is GRPO's advantage with R - tau*log(pi/pi_ref) for R; "
            "the weights carry no gradient, so the optimum pi* is unchanged. 'none': no weights.",
            "choices": GROUP_SCALES,
        },
    )
    guo_coefficient: float = field(
        default=0.5,
        metadata={
            "help": "Guo et al.'s mixes (advantage_pcl_mix, multistep_pcl_mix, guo_pcl_mix): weight c of the forward "
            "term, c * forward + (1 - c) * reversed, where the reversed term regresses the online V on the target's "
            "advantage (their code's sql_loss_coefficients). 1 = the forward form alone, 0 = the reversed one."
        },
    )
    use_target_model: bool | None = field(
        default=None,
        metadata={
            "help": "Keep a slow target network V_bar (a frozen copy updated after each optimizer step). "
            "None = on for the losses that read one (soft_q and the Guo et al. forms; without it they use the online V, "
            "detached)."
        },
    )
    target_model_mixup_alpha: float = field(
        default=0.05,
        metadata={
            "help": "Polyak rate alpha of the target network: target <- (1 - alpha) * target + alpha * policy. "
            "1.0 = hard copy."
        },
    )
    target_model_sync_steps: int = field(
        default=1,
        metadata={"help": "Update the target network every this many optimizer steps."},
    )
    value_head: bool | None = field(
        default=None,
        metadata={
            "help": "A separate linear value head V_phi on the last hidden state: loss_type 'pcl' only "
            "(None = on for pcl)."
        },
    )
    use_reference: bool = field(
        default=True,
        metadata={
            "help": "Regularise towards a reference policy (r~ = r + tau * log pi_ref). With no explicit "
            "reference model it is the initial policy (with PEFT: the base model, adapter disabled). "
            "False = plain max-entropy RL."
        },
    )
    value_anchor: str = field(
        default="reference",
        metadata={
            "help": "Where the logits' values are measured from. 'reference': Q(s,a) = tau (z(s,a) - logsumexp "
            "z_ref(s)) and V(s) = tau (logsumexp z(s) - logsumexp z_ref(s)), so a policy equal to the reference "
            "starts with V = 0 and Q = tau log pi_ref, the exact soft optimum for zero reward (pi is unchanged; a "
            "pretrained LM's arbitrary logit levels no longer count as values). 'none': Q = tau z, V = tau "
            "logsumexp z. Needs a reference; not used by 'pcl' (its V is a value head)."
        },
    )
    ref_model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Explicit reference model (hub id or local path); default: the initial policy."},
    )
    disable_dropout: bool = field(
        default=True, metadata={"help": "Disable dropout in the policy, reference and target models."}
    )
    precompute_ref_log_probs: bool = field(
        default=False,
        metadata={
            "help": "Offline data (mode offline, or the offline rows of mode mixed): compute log pi_ref(a_t|s_t) and "
            "the reference logsumexp (for value_anchor) of every completion token in one pass before training, "
            "store them as dataset columns (cached under $SQLM_CACHE/reference, keyed by the tokenised data and "
            "the reference weights), and train without a reference model in memory (mode offline; mixed keeps it "
            "for the online samples). TRL's DPO name."
        },
    )
    precompute_ref_batch_size: int | None = field(
        default=None,
        metadata={
            "help": "Rows per batch of the precompute_ref_log_probs pass; None = per_device_train_batch_size for the "
            "training data and per_device_eval_batch_size for the evaluation data."
        },
    )

    # ------------------------------------------------------------------ trajectories
    mode: str = field(
        default="offline",
        metadata={
            "help": "Where trajectories come from: 'offline' (the dataset's completions; preference data gives "
            "both chosen and rejected), 'online' (sampled from the current policy at temperature 1 = the "
            "soft policy), 'mixed' (both, see mix_ratio).",
            "choices": MODES,
        },
    )
    mix_ratio: float = field(
        default=0.5,
        metadata={
            "help": "Mixed mode: the share of each batch's prompts that are rolled out online (num_generations "
            "completions each); every other prompt gives its row's offline completions (a preference pair: chosen "
            "and rejected). With pairs and num_generations 2, a batch of B sequences is B/2 rows: mix_ratio*B "
            "online completions and (1-mix_ratio)*B offline ones."
        },
    )
    replay_buffer_size: int = field(
        default=0,
        metadata={"help": "Capacity (trajectories) of the replay buffer of online samples; 0 = no replay."},
    )
    replay_priority: float = field(
        default=0.0,
        metadata={
            "help": "Replay: draw each trajectory with probability proportional to exp(replay_priority * R), R its "
            "summed reward (PCL's prioritised replay); 0 = uniformly. The loss treats replayed paths as any "
            "off-policy data, so the fixed point does not move."
        },
    )
    replay_batch_size: int | None = field(
        default=None,
        metadata={
            "help": "Trajectories drawn from the replay buffer into each micro-batch; None = as many as were "
            "freshly generated."
        },
    )
    num_iterations: int = field(
        default=1,
        metadata={
            "help": "Online: optimizer steps on each generated batch (TRL GRPO's num_iterations). The sampler gives "
            "each step's prompts num_iterations times in a row; the first step generates and scores their "
            "completions, the next num_iterations - 1 train on the same completions again. The path-consistency "
            "losses hold for any trajectory, so the reused (now off-policy) samples need no importance weights. "
            "With num_iterations > 1, resume exactly from checkpoints at multiples of it."
        },
    )
    num_generations: int = field(
        default=2,
        metadata={
            "help": "Online and mixed: completions sampled per prompt. As in TRL's GRPO, the batch sizes count "
            "completions, not prompts: per_device_train_batch_size 8 with num_generations 2 is 4 prompts x 2 "
            "completions, and the global batch (per_device_train_batch_size x gradient_accumulation_steps x "
            "processes) must be divisible by num_generations (mixed mode: per_device_train_batch_size itself)."
        },
    )
    max_completion_length: int | None = field(
        default=256,
        metadata={
            "help": "Maximum completion tokens: the generation limit online, the truncation of completions "
            "offline (None = no limit offline; online it must be set)."
        },
    )
    temperature: float = field(
        default=1.0,
        metadata={
            "help": "Sampling temperature of online rollouts. 1.0 samples the soft policy pi = softmax(logits) "
            "that the losses assume; other values make the data off-policy."
        },
    )
    top_p: float = field(default=1.0, metadata={"help": "Online: nucleus sampling; 1.0 = off."})
    top_k: int | None = field(default=None, metadata={"help": "Online: top-k sampling; None = off."})
    generation_kwargs: dict | str | None = field(
        default=None,
        metadata={
            "help": "Extra `GenerationConfig` arguments for online rollouts (a mapping); with use_vllm, vLLM "
            "`SamplingParams` arguments."
        },
    )
    use_vllm: bool = field(
        default=False,
        metadata={
            "help": "Online and mixed mode: sample rollouts with vLLM through TRL's integration (as GRPOTrainer) "
            "instead of HF generate; the policy's weights are pushed to vLLM before the first rollout after each "
            "optimizer step. Needs the vllm package and a CUDA GPU."
        },
    )
    vllm_mode: str = field(
        default="colocate",
        metadata={
            "help": "'colocate': a vLLM engine in each training process, sharing its GPU; 'server': a separate "
            "`trl vllm-serve` process (see vllm_server_*).",
            "choices": VLLM_MODES,
        },
    )
    vllm_server_base_url: str | None = field(
        default=None,
        metadata={
            "help": "Server mode: base URL of the vLLM server (e.g. http://localhost:8000); overrides "
            "vllm_server_host and vllm_server_port."
        },
    )
    vllm_server_host: str = field(default="0.0.0.0", metadata={"help": "Server mode: host of the vLLM server."})
    vllm_server_port: int = field(default=8000, metadata={"help": "Server mode: port of the vLLM server."})
    vllm_server_timeout: float = field(
        default=240.0, metadata={"help": "Server mode: seconds to wait for the vLLM server to be up."}
    )
    vllm_group_port: int = field(
        default=51216, metadata={"help": "Server mode: port of the weight-update group with the vLLM server."}
    )
    vllm_gpu_memory_utilization: float = field(
        default=0.3,
        metadata={"help": "Colocate mode: fraction of the GPU's memory vLLM reserves (weights, KV cache)."},
    )
    vllm_tensor_parallel_size: int = field(
        default=1, metadata={"help": "Colocate mode: GPUs per vLLM engine (tensor parallelism)."}
    )
    vllm_max_model_length: int | None = field(
        default=None,
        metadata={"help": "vLLM context length (prompt + completion); None = from the model config."},
    )
    vllm_enable_sleep_mode: bool = field(
        default=False,
        metadata={
            "help": "Colocate mode: offload vLLM's weights and KV cache between rollouts (less memory, slower)."
        },
    )

    # ------------------------------------------------------------------ rewards
    reward_funcs: list[str] | None = field(
        default=None,
        metadata={
            "help": "Reward functions by name: a built-in ('keyword', 'length'), a rewarder known to "
            "sqlm.rewards.build_rewarder, 'module:function' with TRL's reward signature (needs "
            "allow_code_rewards), or 'bradley_terry': a reward model fitted on the training pairs first "
            "(sqlm.rewards.auto; cached)."
        },
    )
    reward_weights: list[float] | None = field(
        default=None, metadata={"help": "Weight of each reward function; default 1.0 each."}
    )
    reward_kwargs: dict | str | None = field(
        default=None,
        metadata={"help": "Keyword arguments per reward function name, e.g. {keyword: {words: [good]}}."},
    )
    allow_code_rewards: bool = field(
        default=False,
        metadata={
            "help": "Allow 'module:function' reward functions named in a recipe to be imported (runs that "
            "module's code)."
        },
    )
    chosen_score_column: str | None = field(
        default=None,
        metadata={
            "help": "Preference data: a column of sequence rewards of the chosen completion (e.g. UltraFeedback's "
            "score_chosen), put on its last token."
        },
    )
    rejected_score_column: str | None = field(
        default=None,
        metadata={"help": "Preference data: a column of sequence rewards of the rejected completion."},
    )
    reward_scale: float = field(
        default=1.0, metadata={"help": "Multiply every reward (dataset and functions) by this factor."}
    )
    cache_token_rewards: bool = field(
        default=True,
        metadata={
            "help": "Offline data: compute the dense rewards of model-based rewarders (abc, implicit, prefix, "
            "terminal, uniform) once, store them as dataset columns (chosen_token_rewards, ...) and reuse them "
            "on rerun. The cache is keyed by the data, the reward models' weights and the settings. Python "
            "reward functions always run live."
        },
    )
    reward_cache_dir: str | None = field(
        default=None,
        metadata={"help": "Where cached dense rewards live; default $SQLM_CACHE/rewards (~/.cache/sqlm/rewards)."},
    )

    # ------------------------------------------------------------------ data
    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "Dataset: a hub id, a local folder, or a .json/.jsonl/.parquet/.csv file (relative paths are "
            "also looked up beside the recipe)."
        },
    )
    dataset_config: str | None = field(
        default=None, metadata={"help": "Dataset configuration name (`name` of datasets.load_dataset)."}
    )
    dataset_train_split: str = field(default="train", metadata={"help": "Split to train on."})
    dataset_test_split: str | None = field(
        default=None,
        metadata={
            "help": "Split to evaluate on (a split name, a slice such as 'train[90%:]', or a held-out file); None = "
            "no evaluation set. A single data file has only the split 'train'."
        },
    )
    dataset_test_size: float | None = field(
        default=None,
        metadata={
            "help": "Hold out this fraction (0 < x < 1) or number of rows (>= 1) of the training split as the "
            "evaluation set, as datasets' train_test_split(test_size=...), when there is no dataset_test_split. The "
            "rows are drawn with a fixed seed (the same rows on every run, whatever `seed`) before "
            "max_train_samples / max_eval_samples apply, so training never sees them."
        },
    )
    dataset_column_map: dict | str | None = field(
        default=None,
        metadata={
            "help": "Rename dataset columns to TRL's names before use, e.g. {question: prompt, good: chosen, "
            "bad: rejected}."
        },
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N training rows."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use only the first N evaluation rows."})
    max_length: int | None = field(
        default=1024,
        metadata={
            "help": "Maximum prompt + completion tokens; longer sequences keep their start (as TRL's DPO "
            "collator) and rows whose prompt alone fills it are dropped."
        },
    )
    max_prompt_length: int | None = field(
        default=None,
        metadata={"help": "Maximum prompt tokens; longer prompts keep their end. None = no limit."},
    )
    dataset_num_proc: int | None = field(default=None, metadata={"help": "Processes for tokenizing the dataset."})

    # ------------------------------------------------------------------ model
    model_init_kwargs: dict | str | None = field(
        default=None,
        metadata={
            "help": "Keyword arguments for `from_pretrained` when the trainer gets a model id (dtype, "
            "attn_implementation, trust_remote_code...)."
        },
    )
    trust_remote_code: bool = field(
        default=False,
        metadata={
            "help": "Run the Python code shipped in the model's repository (custom architectures), as TRL's "
            "trainer configs. Off by default: only turn it on for a repository you trust."
        },
    )
    merge_adapter: bool = field(
        default=False,
        metadata={"help": "With LoRA: also save the adapter merged into the base model (in output_dir/merged)."},
    )

    # ------------------------------------------------------------------ reliability
    nan_policy: str = field(
        default="stop",
        metadata={
            "help": "What a NaN/inf in a reward, a value or the loss does: 'stop' (the run ends with an error "
            "naming the step and the source; no update and no checkpoint for it) or 'skip' (that optimizer "
            "step makes no update; skipped steps are counted and logged as nonfinite/skipped_steps).",
            "choices": NAN_POLICIES,
        },
    )

    # ------------------------------------------------------------------ overridden defaults
    bf16: bool | None = field(
        default=None,
        metadata={"help": "bf16 mixed precision. None = on only when a bf16-capable accelerator is present."},
    )
    remove_unused_columns: bool = field(
        default=False,
        metadata={"help": "Keep the dataset columns: reward functions read them. Must stay False."},
    )
    ddp_find_unused_parameters: bool | None = field(
        default=False,
        metadata={"help": "DDP: look for parameters unused in the forward (every sqlm parameter is used)."},
    )
    logging_steps: float = field(
        default=10, metadata={"help": "Log every this many optimizer steps (or a fraction of them)."}
    )
    dataloader_pin_memory: bool | None = field(
        default=None,
        metadata={
            "help": "Pin data loader memory for faster host-to-device copies. None = on only when an "
            "accelerator is used (pinning has no use on a CPU run)."
        },
    )

    def __post_init__(self):
        if self.bf16 is None:
            self.bf16 = (not self.fp16) and (not self.use_cpu) and accelerator_supports_bf16()
        if self.dataloader_pin_memory is None:
            self.dataloader_pin_memory = (not self.use_cpu) and _accelerator_available()
        if self.beta is not None:
            self.tau = self.beta
        if self.loss_type == "auto":
            self.loss_type = default_loss_type(self.mode, self.num_generations)
        for name in ("generation_kwargs", "reward_kwargs", "dataset_column_map", "model_init_kwargs"):
            setattr(self, name, as_mapping(getattr(self, name), name))
        self._validate()
        super().__post_init__()
        self._validate_generation_batches()

    def _validate_generation_batches(self) -> None:
        """TRL GRPO's check: a batch of completions holds whole groups of ``num_generations``."""
        g = self.num_generations
        if self.mode == "online":
            n = self.per_device_train_batch_size * self.gradient_accumulation_steps * self.world_size
            if n % g:
                raise SqlmError(
                    f"keys 'per_device_train_batch_size' ({self.per_device_train_batch_size}) x gradient_accumulation_steps "
                    f"({self.gradient_accumulation_steps}) x processes ({self.world_size}) = {n} completions per step "
                    f"must be divisible by 'num_generations' ({g}): online batches count completions, as TRL's GRPO"
                )
        elif self.mode == "mixed" and self.per_device_train_batch_size % g:
            raise SqlmError(
                f"key 'per_device_train_batch_size' ({self.per_device_train_batch_size}) must be divisible by "
                f"'num_generations' ({g}) in mixed mode: each batch holds whole prompts, rolled out or offline"
            )

    def _validate(self) -> None:
        """Every key checked before any model loads, one section at a time; the first bad key raises a
        one-line error that names it."""
        self._validate_loss()
        self._validate_target_and_reference()
        self._validate_trajectories()
        self._check_engine()
        self._validate_rewards()
        self._validate_data()
        if self.nan_policy not in NAN_POLICIES:
            raise choice_error("nan_policy", self.nan_policy, NAN_POLICIES)
        self._validate_training_ranges()

    def _validate_loss(self) -> None:
        """The loss: its type, temperature, discount, rollout length, reduction, Guo et al.'s mix and
        whether it has a value head."""
        if self.loss_type not in LOSS_SPECS:
            raise choice_error("loss_type", self.loss_type, LOSS_SPECS)
        if not (self.tau > 0 and math.isfinite(self.tau)):
            raise _bad("tau" if self.beta is None else "beta", f"must be a finite number > 0, got {self.tau!r}")
        if not 0 < self.gamma <= 1:
            raise _bad("gamma", f"must be in (0, 1], got {self.gamma!r}")
        if self.rollout_length is not None and self.rollout_length < 1:
            raise _bad("rollout_length", f"must be >= 1 or null, got {self.rollout_length!r}")
        if self.reduction not in TRAIN_REDUCTIONS:
            raise choice_error("reduction", self.reduction, TRAIN_REDUCTIONS)
        if self.group_scale not in GROUP_SCALES:
            raise choice_error("group_scale", self.group_scale, GROUP_SCALES)
        if self.group_scale != "none" and self.loss_type != "group_pcl":
            raise _bad("group_scale", f"applies to loss_type 'group_pcl' only, not '{self.loss_type}'")
        if not 0 <= self.guo_coefficient <= 1:
            raise _bad("guo_coefficient", f"must be in [0, 1], got {self.guo_coefficient!r}")
        needs_head = LOSS_SPECS[self.loss_type].needs_value_head
        if self.value_head is False and needs_head:
            raise _bad(
                "value_head", f"must be on for loss_type '{self.loss_type}' (its V comes from a separate value head)"
            )
        if self.value_head and not needs_head:
            users = " or ".join(f"'{n}'" for n, s in LOSS_SPECS.items() if s.needs_value_head)
            raise _bad(
                "value_head", f"is used only by loss_type {users}, not '{self.loss_type}' (V comes from the logits)"
            )

    def _validate_target_and_reference(self) -> None:
        """The target network's update, the values' anchor and the precomputed reference pass."""
        if not 0 < self.target_model_mixup_alpha <= 1:
            raise _bad("target_model_mixup_alpha", f"must be in (0, 1], got {self.target_model_mixup_alpha!r}")
        if self.target_model_sync_steps < 1:
            raise _bad("target_model_sync_steps", f"must be >= 1, got {self.target_model_sync_steps!r}")
        if self.value_anchor not in VALUE_ANCHORS:
            raise choice_error("value_anchor", self.value_anchor, VALUE_ANCHORS)
        if self.precompute_ref_log_probs:
            if self.mode == "online":
                raise SqlmError(
                    "key 'precompute_ref_log_probs' needs offline data, but mode is 'online' (online samples "
                    "are scored by a live reference): use mode 'offline' or 'mixed', or turn "
                    "precompute_ref_log_probs off"
                )
            if not self.use_reference:
                raise SqlmError(
                    "key 'precompute_ref_log_probs' needs use_reference: true (there is no reference to precompute)"
                )
        if self.precompute_ref_batch_size is not None and self.precompute_ref_batch_size < 1:
            raise _bad("precompute_ref_batch_size", f"must be >= 1 or null, got {self.precompute_ref_batch_size!r}")

    def _validate_trajectories(self) -> None:
        """Where trajectories come from: the mode and its mix, online generation (group size, length
        limit, sampling, vLLM) and the replay buffer."""
        if self.mode not in MODES:
            raise choice_error("mode", self.mode, MODES)
        if not 0 <= self.mix_ratio <= 1:
            raise _bad("mix_ratio", f"must be in [0, 1], got {self.mix_ratio!r}")
        if LOSS_SPECS[self.loss_type].needs_groups and self.mode != "offline" and self.num_generations < 2:
            raise _bad(
                "num_generations",
                f"must be >= 2 for loss_type '{self.loss_type}' online (a completion alone in its prompt group "
                f"has no signal), got {self.num_generations!r}",
            )
        if self.num_generations < 1:
            raise _bad("num_generations", f"must be >= 1, got {self.num_generations!r}")
        if self.mode != "offline" and not self.max_completion_length:
            raise _bad("max_completion_length", f"must be set for mode '{self.mode}' (the generation limit)")
        if self.use_vllm:
            self._check_vllm()
        if self.replay_buffer_size < 0:
            raise _bad("replay_buffer_size", f"must be >= 0, got {self.replay_buffer_size!r}")
        if not (math.isfinite(self.replay_priority) and self.replay_priority >= 0):
            raise _bad("replay_priority", f"must be a finite number >= 0, got {self.replay_priority!r}")
        if self.replay_batch_size is not None and self.replay_batch_size < 0:
            raise _bad("replay_batch_size", f"must be >= 0 or null, got {self.replay_batch_size!r}")
        if self.num_iterations < 1:
            raise _bad("num_iterations", f"must be >= 1, got {self.num_iterations!r}")
        if self.num_iterations > 1 and self.mode != "online":
            raise _bad("num_iterations", f"reuses generated batches: it needs mode 'online', got mode '{self.mode}'")
        if self.temperature <= 0:
            raise _bad("temperature", f"must be > 0, got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise _bad("top_p", f"must be in (0, 1], got {self.top_p!r}")
        if self.top_k is not None and self.top_k < 1:
            raise _bad("top_k", f"must be >= 1 or null, got {self.top_k!r}")

    def _validate_rewards(self) -> None:
        """The reward functions' names (and 'bradley_terry''s settings), weights and scale."""
        for name in self.reward_funcs or []:
            if isinstance(name, str) and ":" not in name:
                from .rewards.registry import unknown_name_error

                if msg := unknown_name_error(name):
                    raise SqlmError(f"key 'reward_funcs': {msg}")
        from .rewards.auto import AUTO_REWARD, AutoRewardSettings

        if AUTO_REWARD in (self.reward_funcs or []):  # its settings, checked before any model loads
            AutoRewardSettings.from_kwargs((self.reward_kwargs or {}).get(AUTO_REWARD), self)
        if self.reward_weights is not None:
            n = len(self.reward_funcs or [])
            if len(self.reward_weights) != n:
                raise _bad("reward_weights", f"has {len(self.reward_weights)} values for {n} reward_funcs")
        if not math.isfinite(self.reward_scale):
            raise _bad("reward_scale", f"must be a finite number, got {self.reward_scale!r}")
        for i, w in enumerate(self.reward_weights or []):
            if not isinstance(w, (int, float)) or not math.isfinite(w):
                raise _bad("reward_weights", f"must be finite numbers, got {w!r} at position {i}")

    def _validate_data(self) -> None:
        """Data loading: the length limits and sample counts, the raw columns kept, the hold-out keys."""
        for key in (
            "max_length",
            "max_prompt_length",
            "max_completion_length",
            "max_train_samples",
            "max_eval_samples",
        ):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise _bad(key, f"must be >= 1 or null, got {value!r}")
        if (
            self.max_length is not None
            and self.max_prompt_length is not None
            and self.max_prompt_length >= self.max_length
        ):
            raise _bad(
                "max_prompt_length",
                f"must be < max_length ({self.max_length}) to leave room for a completion, "
                f"got {self.max_prompt_length!r}",
            )
        if self.remove_unused_columns:
            raise _bad("remove_unused_columns", "must be false: rewards and rollouts read the raw columns")
        check_hold_out(self.dataset_test_size, self.dataset_test_split)

    def sharding_engine(self) -> tuple[str, int] | None:
        """``("deepspeed", zero stage)``, ``("fsdp", version)`` or None: from this config's ``deepspeed`` /
        ``fsdp`` keys or, under ``accelerate launch``, from the variables its config file sets."""
        import os

        ds = self.deepspeed
        if isinstance(ds, str) and ds.endswith(".json") and os.path.isfile(ds):
            with open(ds) as f:
                ds = json.load(f)
        if isinstance(ds, dict):
            return "deepspeed", int((ds.get("zero_optimization") or {}).get("stage", 0) or 0)
        if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
            return "deepspeed", int(os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2") or 2)
        if self.fsdp:
            return "fsdp", int((self.fsdp_config or {}).get("version", 1) if isinstance(self.fsdp_config, dict) else 1)
        if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
            return "fsdp", int(os.environ.get("FSDP_VERSION", "1") or 1)
        return None

    def _check_engine(self) -> None:
        """What ZeRO-3 / FSDP cannot run yet, refused before any model is loaded."""
        engine = self.sharding_engine()
        if engine is None:
            return
        name = (
            "DeepSpeed ZeRO-3" if engine == ("deepspeed", 3) else f"FSDP{engine[1]}" if engine[0] == "fsdp" else None
        )
        if engine == ("fsdp", 1) and self.uses_target_model:
            raise SqlmError(
                f"loss_type '{self.loss_type}' keeps a target network, which needs FSDP2 (fsdp_version: 2 in "
                "the accelerate config) or DeepSpeed; FSDP1 is not supported"
            )
        if name is not None and self.precompute_ref_log_probs:
            raise SqlmError(
                f"key 'precompute_ref_log_probs' is not supported under {name} (the pass reads the whole "
                "reference on one process): use DDP or ZeRO-2, or precompute_ref_log_probs: false"
            )
        loaded = self.model_reward_funcs()
        if engine == ("deepspeed", 3) and loaded:
            raise SqlmError(
                f"key 'reward_funcs': '{loaded[0]}' loads a model, which is not supported under DeepSpeed ZeRO-3 "
                "(transformers partitions every model loaded once ZeRO-3 is configured, and sqlm does not "
                "prepare reward models for it): use FSDP2, ZeRO-2 or DDP, or rewards from the data or a "
                "Python function"
            )

    def model_reward_funcs(self) -> list[str]:
        """The entries of ``reward_funcs`` that load a model (a reward model, the DPO pair of 'implicit',
        the fitted 'bradley_terry'), with 'weighted' components as ``weighted/<name>``."""
        from .rewards.auto import AUTO_REWARD
        from .rewards.registry import REWARD_MODEL_REWARDERS

        with_model = {*REWARD_MODEL_REWARDERS, "implicit", AUTO_REWARD}
        out = []
        for name in self.reward_funcs or []:
            if name in with_model:
                out.append(name)
            elif name == "weighted":
                spec = (self.reward_kwargs or {}).get("weighted") or {}
                components = spec.get("components") if isinstance(spec, dict) else None
                for c in components or []:
                    if isinstance(c, dict) and c.get("name") in with_model:
                        out.append(f"weighted/{c['name']}")
        return out

    def _check_vllm(self) -> None:
        """``use_vllm`` needs rollouts, a known vllm_mode, the vllm package and a CUDA GPU: checked here,
        before any model is loaded."""
        if self.mode == "offline":
            raise SqlmError("key 'use_vllm' is for mode 'online' or 'mixed'; mode 'offline' generates nothing")
        if self.vllm_mode not in VLLM_MODES:
            raise choice_error("vllm_mode", self.vllm_mode, VLLM_MODES)
        if not 0 < self.vllm_gpu_memory_utilization <= 1:
            raise SqlmError(
                f"key 'vllm_gpu_memory_utilization' must be in (0, 1], got {self.vllm_gpu_memory_utilization!r}"
            )
        if self.vllm_tensor_parallel_size < 1:
            raise SqlmError(f"key 'vllm_tensor_parallel_size' must be >= 1, got {self.vllm_tensor_parallel_size!r}")
        missing = []
        if not _vllm_available():
            missing.append("the vllm package (pip install 'trl[vllm]'), which is not installed")
        if self.use_cpu:
            missing.append("a CUDA GPU, but use_cpu is true")
        elif not _cuda_available():
            missing.append("a CUDA GPU, and none is visible")
        if missing:
            raise SqlmError(
                f"key 'use_vllm' needs {' and '.join(missing)}: set use_vllm: false to sample with HF generate"
            )

    def _validate_training_ranges(self) -> None:
        """The TrainingArguments fields users set most, checked before transformers or torch trip over them."""
        number = functools.partial(_finite_number, self)
        if number("learning_rate") <= 0:
            raise _bad("learning_rate", f"must be > 0, got {self.learning_rate!r}")
        for key in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
            if number(key) < 1:
                raise _bad(key, f"must be >= 1, got {getattr(self, key)!r}")
        if number("max_steps") < 1 and self.max_steps != -1:
            raise _bad("max_steps", f"must be >= 1, or -1 to train for num_train_epochs, got {self.max_steps!r}")
        if number("num_train_epochs") <= 0:
            raise _bad("num_train_epochs", f"must be > 0, got {self.num_train_epochs!r}")
        warmup = number("warmup_steps")
        if warmup < 0 or (warmup >= 1 and warmup != int(warmup)):
            raise _bad(
                "warmup_steps",
                f"must be a whole number of steps >= 0 or a ratio in [0, 1) of the steps, got {warmup!r}",
            )
        for key in ("logging_steps", "eval_steps", "save_steps"):
            value = getattr(self, key)
            if (value is None and key != "logging_steps") or getattr(self, key.replace("_steps", "_strategy")) == "no":
                continue
            value = number(key)
            if value <= 0 or (value > 1 and value != int(value)):
                raise _bad(
                    key, f"must be a whole number of steps >= 1 or a fraction in (0, 1] of the steps, got {value!r}"
                )
        for key in ("weight_decay", "max_grad_norm"):
            if number(key) < 0:
                raise _bad(key, f"must be >= 0, got {getattr(self, key)!r}")
        for key in ("adam_beta1", "adam_beta2"):
            if not 0 <= number(key) < 1:
                raise _bad(key, f"must be in [0, 1), got {getattr(self, key)!r}")
        if number("adam_epsilon") <= 0:
            raise _bad("adam_epsilon", f"must be > 0, got {self.adam_epsilon!r}")
        if self.dataloader_num_workers < 0:
            raise _bad("dataloader_num_workers", f"must be >= 0, got {self.dataloader_num_workers!r}")

    @property
    def uses_target_model(self) -> bool:
        if self.use_target_model is None:
            return LOSS_SPECS[self.loss_type].needs_target
        return bool(self.use_target_model)

    @property
    def uses_value_head(self) -> bool:
        return LOSS_SPECS[self.loss_type].needs_value_head if self.value_head is None else bool(self.value_head)


@dataclass
class ModelConfig(trl.ModelConfig):
    """TRL's model arguments (``model_name_or_path``, ``dtype``, ``attn_implementation``,
    ``use_peft``, ``lora_*``; ``trust_remote_code`` is a :class:`SoftQConfig` key, off by default).
    ``model_name_or_path: tiny:...`` builds a tiny model offline (see :func:`sqlm.tiny.build_tiny_model`)."""

    def __post_init__(self):
        # TRL collapses a one-element lora_target_modules list to a string; keep the declared list
        # type (the recipe checker reads it) and collapse it when building the LoraConfig.
        if self.load_in_8bit and self.load_in_4bit:
            raise SqlmError("keys 'load_in_8bit' and 'load_in_4bit' cannot both be true")


def check_train_args(args: SoftQConfig, model_args: ModelConfig) -> None:
    """Checks across the two dataclasses of a ``sqlm train`` recipe."""
    if args.merge_adapter and not model_args.use_peft:
        raise SqlmError("key 'merge_adapter' needs use_peft: true (there is no LoRA adapter to merge without it)")


def get_peft_config(model_args: ModelConfig):
    """A ``peft.LoraConfig`` from the model arguments, or None without ``use_peft``."""
    if not model_args.use_peft:
        return None
    from peft import LoraConfig

    targets = model_args.lora_target_modules
    if isinstance(targets, list) and len(targets) == 1:
        targets = targets[0]  # e.g. "all-linear"
    kwargs = {}
    if model_args.lora_target_parameters is not None:
        kwargs["target_parameters"] = model_args.lora_target_parameters
    return LoraConfig(
        task_type=model_args.lora_task_type,
        r=model_args.lora_r,
        target_modules=targets,
        lora_alpha=model_args.lora_alpha,
        lora_dropout=model_args.lora_dropout,
        bias="none",
        use_rslora=model_args.use_rslora,
        use_dora=model_args.use_dora,
        modules_to_save=model_args.lora_modules_to_save,
        **kwargs,
    )


TRAIN_DATACLASSES = (SoftQConfig, ModelConfig)
