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
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

import torch

from .data import ALL_REF_COLUMNS, REF_COLUMNS, offline_trajectories, pack_trajectories
from .errors import SqlmError


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
