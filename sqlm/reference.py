"""Precomputed reference values (``precompute_ref_log_probs``, TRL's name): one pass of the reference
policy over the tokenised offline data stores ``log pi_ref(a_t|s_t)`` and ``logsumexp z_ref(s_t)`` of
every completion token as dataset columns (:data:`sqlm.data.REF_COLUMNS`), so training needs no
reference model in memory.

The pass packs the data's own trajectories exactly as the trainer does
(:func:`sqlm.data.offline_trajectories`, :func:`sqlm.data.pack_trajectories`) and reads the
reference through :func:`sqlm.forward.model_log_pi`, so a column value is the number the live
reference would give that token. The columns are cached like the dense rewards
(:mod:`sqlm.rewards.cache`): under ``cache_dir/<key>/``, keyed by the tokenised data (so the
tokenizer and every truncation setting), the reference's weights and the precision.

:class:`Reference` is the reference of a training run as one object, whichever it is: a model of its
own (explicit, or a frozen copy of the initial policy), the PEFT policy's base (its adapters
disabled), the precomputed columns (with the initial policy read once by the precompute pass), or
none (``use_reference: false``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from .data import ALL_REF_COLUMNS, REF_COLUMNS, offline_trajectories, pack_trajectories
from .errors import SqlmError
from .forward import adapter_active, model_log_pi
from .paths import cache_dir as sqlm_cache_dir
from .soft import SoftOutputs
from .target import frozen_copy


logger = logging.getLogger(__name__)

CACHE_VERSION = 1
# (packed batch) -> (log pi_ref, logsumexp z_ref), each [N, L-1-start]
RefFn = Callable[[dict], tuple[torch.Tensor, torch.Tensor]]


def reference_fingerprint(model, skip_adapters: bool = False) -> str:
    """Hash of a reference model's class and weights; with ``skip_adapters`` (a PEFT model read with
    its adapters disabled) the adapter weights are left out: only the base counts."""
    adapters = set(getattr(model, "peft_config", {}) or {}) if skip_adapters else set()
    h = hashlib.blake2b(digest_size=16)
    h.update(type(model).__name__.encode())
    for name, t in sorted(model.state_dict().items()):
        if adapters and adapters & set(name.split(".")):
            continue
        t = t.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def compute_ref_columns(dataset, ref_fn: RefFn, pad_token_id: int, batch_size: int, device=None) -> dict[str, list]:
    """The reference columns of a tokenised offline dataset, computed live, one list per row and side."""
    rows = dataset.with_format(None)
    sides = ["chosen", "rejected"] if "chosen_ids" in rows.column_names else ["completion"]
    out: dict[str, list] = {c: [] for side in sides for c in REF_COLUMNS[side]}
    for begin in range(0, len(rows), batch_size):
        chunk = rows[begin : begin + batch_size]
        n = len(next(iter(chunk.values())))
        examples = [{k: v[i] for k, v in chunk.items() if k not in ALL_REF_COLUMNS} for i in range(n)]
        trajs = [t for ex in examples for t in offline_trajectories(ex)]
        if len(trajs) != n * len(sides):
            raise SqlmError(f"rows {begin}..{begin + n - 1}: precompute_ref_log_probs needs a completion in every row")
        batch = pack_trajectories(trajs, [torch.zeros(len(t.completion_ids)) for t in trajs], pad_token_id)
        first = batch["completion_mask"].float().argmax(-1)
        start = max(int(first.min()) - 1, 0)
        batch["logits_start"] = start
        batch["path_mask"] = batch["completion_mask"][:, 1:]  # every completion token, EOS or not
        if device is not None:
            batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        log_pi, lse = (x.float().cpu() for x in ref_fn(batch))
        for i, t in enumerate(trajs):
            p, c = len(t.prompt_ids), len(t.completion_ids)
            steps = slice(p - start - 1, p + c - start - 1)  # step k acts with the token at k + start + 1
            lp_col, lse_col = REF_COLUMNS[t.source]
            out[lp_col].append(log_pi[i, steps].tolist())
            out[lse_col].append(lse[i, steps].tolist())
    return out


def add_ref_columns(
    dataset,
    ref_fn: RefFn,
    *,
    ref_fingerprint: str,
    pad_token_id: int,
    batch_size: int,
    precision: str = "float32",
    cache_dir: str | os.PathLike | None = None,
    device=None,
):
    """``dataset`` (tokenised: ``prompt_ids`` and ``chosen_ids``/``rejected_ids`` or
    ``completion_ids``) with the reference columns added; with ``cache_dir`` they are stored under
    ``cache_dir/<key>/`` and reused while the tokenised data, the reference weights and the precision
    are unchanged."""
    from datasets import Dataset, load_from_disk

    from .rewards.cache import dataset_fingerprint

    cols = getattr(dataset, "column_names", None)
    if cols is None or "prompt_ids" not in cols:
        raise SqlmError("precompute_ref_log_probs needs a tokenised map-style dataset (not an iterable one)")
    base = dataset.remove_columns([c for c in ALL_REF_COLUMNS if c in cols])
    desc = {
        "version": CACHE_VERSION,
        "data": dataset_fingerprint(base),
        "reference": ref_fingerprint,
        "precision": precision,
    }
    key = hashlib.blake2b(json.dumps(desc, sort_keys=True).encode(), digest_size=16).hexdigest()
    path = Path(cache_dir) / key if cache_dir is not None else None
    if path is not None and (path / "meta.json").is_file():
        cached = load_from_disk(str(path / "columns"))
        if len(cached) == len(base):
            logger.info("reference log-probs: reusing cache %s", path)
            for c in cached.column_names:
                base = base.add_column(c, cached[c])
            return base
    values = compute_ref_columns(base, ref_fn, pad_token_id, batch_size, device=device)
    if path is not None:
        path.mkdir(parents=True, exist_ok=True)
        Dataset.from_dict(values).save_to_disk(str(path / "columns"))
        (path / "meta.json").write_text(json.dumps(desc, sort_keys=True, indent=1))
    for c, v in values.items():
        base = base.add_column(c, v)
    return base


# ----------------------------------------------------------------------------- the reference of a run


class Reference:
    """``log pi_ref(a_t|s_t)`` of a training batch.

    ``model``: a reference model of its own (explicit, or a frozen copy of the initial policy);
    ``peft_base``: the PEFT policy read with every adapter disabled; ``initial_policy``: the policy
    before its first step is the reference and is read once by :meth:`precompute`. Neither: no
    live reference (none at all, or only the precomputed columns)."""

    def __init__(self, model: nn.Module | None = None, peft_base: bool = False, initial_policy: bool = False):
        self.model = model
        self.peft_base = peft_base
        self.initial_policy = initial_policy

    @classmethod
    def build(cls, model: nn.Module, ref_model: nn.Module | None, args, peft: bool) -> Reference:
        """The reference ``args`` asks for, from the initial policy ``model`` (before PEFT wraps it) and
        an explicit ``ref_model`` (or None). Without one: with PEFT (``peft``) the base model; precomputed
        offline (``precompute_ref_log_probs``, mode offline) the initial policy itself, read once before
        training; otherwise a frozen copy of it."""
        if not args.use_reference:
            return cls()
        if ref_model is None:
            if peft:
                return cls(peft_base=True)
            if args.precompute_ref_log_probs and args.mode == "offline":
                return cls(initial_policy=True)
            ref_model = frozen_copy(model)
        ref_model.eval()
        ref_model.requires_grad_(False)
        return cls(ref_model)

    @property
    def live(self) -> bool:
        """A batch's reference values can be computed now (not only read from precomputed columns)."""
        return self.model is not None or self.peft_base

    def precompute(self, policy: nn.Module, train_dataset, eval_dataset, args, pad_token_id: int):
        """``(train_dataset, eval_dataset)`` with the reference columns of their offline rows when
        ``precompute_ref_log_probs`` (one pass, cached); mode offline then keeps no reference model at
        all (mixed keeps it for the online samples)."""
        if not args.precompute_ref_log_probs or not (self.live or self.initial_policy):
            return train_dataset, eval_dataset
        reader = policy if self.model is None else self.model
        train_dataset = self._with_columns(reader, train_dataset, args, pad_token_id, args.per_device_train_batch_size)
        if eval_dataset is not None:
            eval_dataset = self._with_columns(
                reader, eval_dataset, args, pad_token_id, args.per_device_eval_batch_size
            )
        if args.mode == "offline":
            self.model, self.peft_base = None, False
        return train_dataset, eval_dataset

    def _with_columns(self, reader, dataset, args, pad_token_id: int, batch_size: int):
        """``dataset`` with the reference columns (computed once by the main process, then read from the
        cache by the others). ``reader`` is the explicit reference, or the policy before its first step:
        with PEFT read with every adapter disabled, else as it is (the initial policy is the reference)."""
        from accelerate import PartialState

        peft_base = self.peft_base  # reader is the PEFT policy; its base is the reference
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

    def prepare(self, prepare: Callable[[nn.Module], nn.Module]) -> None:
        """Once the Trainer exists: wrap a reference model for the engine."""
        if self.model is not None:
            self.model = prepare(self.model)

    def log_pi(self, policy: nn.Module, inputs: dict, return_lse: bool = False):
        """``log pi_ref(a_t|s_t)`` ``[N, T]`` (with ``return_lse`` also ``logsumexp z_ref(s_t)``): the
        precomputed columns of the rows that carry them, and for the others the live reference, or None
        (no reference). ``policy`` is the unwrapped policy (its base is the reference with PEFT)."""
        pre = inputs.get("ref_precomputed")
        if pre is None or not bool(pre.any()):
            return self._live_log_pi(policy, inputs, return_lse)
        start = int(inputs["logits_start"])
        log_pi, lse = inputs["ref_log_probs"][:, start + 1 :], inputs["ref_logsumexp"][:, start + 1 :]
        if not bool(pre.all()):  # e.g. mixed mode: the online rows need the live reference
            rows = (~pre).nonzero().squeeze(-1)
            sub = {k: inputs[k][rows] for k in ("input_ids", "attention_mask", "path_mask") if k in inputs}
            live = self._live_log_pi(policy, {**sub, "logits_start": start}, True)
            if live[0] is None:
                raise SqlmError(
                    "a batch has rows without precomputed reference log-probs (precompute_ref_log_probs) "
                    "and no reference model is loaded"
                )
            log_pi, lse = log_pi.clone(), lse.clone()
            log_pi[rows], lse[rows] = live[0].to(log_pi.dtype), live[1].to(lse.dtype)
        return (log_pi, lse) if return_lse else log_pi

    def _live_log_pi(self, policy: nn.Module, inputs: dict, return_lse: bool = False):
        if self.model is not None:
            return model_log_pi(self.model, inputs, return_lse)
        if self.peft_base:
            with adapter_active(policy, None):
                return model_log_pi(policy, inputs, return_lse)
        return (None, None) if return_lse else None


def anchor_to_reference(
    soft: SoftOutputs, target_v: torch.Tensor | None, ref_lse: torch.Tensor, mask: torch.Tensor, tau: float
) -> tuple[SoftOutputs, torch.Tensor | None]:
    """``value_anchor: reference``: Q and V (and the target's ``V_bar``) measured from the reference's
    ``tau * logsumexp z_ref(s_t)`` on the path ``mask``; pi is unchanged, and ``V = 0`` where
    ``pi = pi_ref``."""
    anchor = tau * ref_lse * mask
    soft = SoftOutputs(q=soft.q - anchor, v=soft.v - anchor, log_pi=soft.log_pi, entropy=soft.entropy)
    return soft, (target_v - anchor if target_v is not None else None)
