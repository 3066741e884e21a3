"""Checkpoints of a training run: the completion marker, the rotation and the state the HF checkpoint lacks.

* **Complete checkpoints.** A checkpoint folder counts only once :func:`mark_complete` has written
  ``sqlm_checkpoint.json`` into it, after every file of every process is on disk (fsynced). A kill
  while saving leaves a folder without the marker, which :func:`latest_complete_checkpoint` (what
  ``--resume_from_checkpoint true`` resumes from) skips and :func:`resolve_resume` refuses by path.
  :func:`rotate` removes old ones (``save_total_limit``), called only once the new one is
  complete; :func:`clear_partial` removes a half-written folder of the step first.
* **Auxiliary state.** :func:`save_aux_state` / :func:`load_aux_state` write and read what the HF
  checkpoint lacks: each process's replay buffer and the trainer's counters (JSON; no pickles). The
  target network saves its own weights (:meth:`sqlm.target.TargetNetwork.save`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .errors import SqlmError


COMPLETE_MARKER = "sqlm_checkpoint.json"
STATE_FILE = "sqlm_state.json"  # trainer state outside the HF TrainerState (mixed-mode credit, skip count)
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


# ----------------------------------------------------------------------------- complete checkpoints


def checkpoint_step(path: str | os.PathLike) -> int | None:
    m = _CHECKPOINT_RE.match(Path(path).name)
    return int(m.group(1)) if m else None


def is_complete(folder: str | os.PathLike) -> bool:
    return (Path(folder) / COMPLETE_MARKER).is_file()


def _fsync(path: Path, directory: bool = False) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def mark_complete(folder: str | os.PathLike, step: int) -> None:
    """Flush every file of ``folder`` to disk, then write the completion marker atomically
    (temporary name, fsync, rename). Call once every process has finished writing ``folder``."""
    folder = Path(folder)
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            _fsync(p)
    _fsync(folder, directory=True)
    tmp = folder / (COMPLETE_MARKER + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(
            {
                "step": int(step),
                "files": sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p != tmp),
            },
            f,
            indent=1,
        )
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, folder / COMPLETE_MARKER)
    _fsync(folder, directory=True)


def checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """``checkpoint-N`` folders of ``output_dir``, by step."""
    d = Path(output_dir)
    if not d.is_dir():
        return []
    found = [p for p in d.iterdir() if p.is_dir() and checkpoint_step(p) is not None]
    return sorted(found, key=checkpoint_step)


def latest_complete_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The complete checkpoint with the highest step (half-written ones are skipped)."""
    done = [p for p in checkpoints(output_dir) if is_complete(p)]
    return done[-1] if done else None


def resolve_resume(value: str | bool | None, output_dir: str | os.PathLike) -> str | None:
    """``resume_from_checkpoint`` -> a complete checkpoint folder, or None (start fresh).

    ``true`` / ``latest`` / ``last``: the newest complete checkpoint of ``output_dir`` (an error when
    there is none); a path: that folder, which must be a complete checkpoint."""
    if value is None or value is False or (isinstance(value, str) and value.strip().lower() in ("", "false", "none")):
        return None
    if value is True or str(value).strip().lower() in ("true", "latest", "last"):
        found = latest_complete_checkpoint(output_dir)
        if found is None:
            partial = [p.name for p in checkpoints(output_dir)]
            extra = f" ({', '.join(partial)} never finished saving)" if partial else ""
            raise SqlmError(f"resume_from_checkpoint: no complete checkpoint in output_dir {output_dir}{extra}")
        return str(found)
    path = Path(str(value))
    if not path.is_dir():
        raise SqlmError(f"resume_from_checkpoint: no checkpoint folder at {path}")
    if not is_complete(path):
        raise SqlmError(
            f"resume_from_checkpoint: {path} is not a complete checkpoint (no {COMPLETE_MARKER}: the run "
            f"stopped while saving it); resume from 'latest' or an older checkpoint"
        )
    return str(path)


def clear_partial(folder: str | os.PathLike) -> None:
    """Remove ``folder`` before a checkpoint is saved into it (e.g. half-written by a killed run)."""
    if os.path.isdir(folder):
        shutil.rmtree(folder)


def rotate(run_dir: str | os.PathLike, save_total_limit: int | None, best_model_checkpoint: str | None = None) -> None:
    """Remove the oldest checkpoints of ``run_dir`` beyond ``save_total_limit`` (the newest and the best
    are kept). Call only after the newest one is marked complete."""
    from transformers.trainer_utils import rotate_checkpoints

    rotate_checkpoints(str(run_dir), save_total_limit, best_model_checkpoint, use_mtime=True)


@contextmanager
def tensors_only(checkpoint: str | os.PathLike | None) -> Iterator[None]:
    """Around the load of a checkpoint's optimizer / scheduler state: transformers reads these torch
    files with ``weights_only=True`` (no code runs); a file that holds more than tensors is refused
    with a one-line error."""
    import pickle

    try:
        yield
    except pickle.UnpicklingError as e:
        msg = " ".join(str(e).split())[:300]
        raise SqlmError(
            f"checkpoint {checkpoint}: refusing to load optimizer/scheduler state that holds "
            f"more than tensors (weights_only load failed: {msg})"
        ) from None


# ----------------------------------------------------------------------------- auxiliary state


def save_aux_state(
    folder: str | os.PathLike,
    *,
    replay_buffer=None,
    process_index: int = 0,
    is_main: bool = True,
    counters: dict[str, Any] | None = None,
) -> None:
    """Write into ``folder``: this process's replay buffer (JSON, when not empty) and ``counters`` (JSON;
    main process)."""
    os.makedirs(folder, exist_ok=True)
    if replay_buffer is not None and replay_buffer.size > 0:
        with open(os.path.join(folder, f"replay_buffer_rank{process_index}.json"), "w") as f:
            json.dump(replay_buffer.state_dict(), f, default=str)
    if is_main and counters is not None:
        with open(os.path.join(folder, STATE_FILE), "w") as f:
            json.dump(counters, f)


def load_aux_state(folder: str | os.PathLike, *, replay_buffer=None, process_index: int = 0) -> dict[str, Any]:
    """Restore what :func:`save_aux_state` wrote: the replay buffer, in place; returns the counters
    (``{}`` when none were saved)."""
    rb = os.path.join(folder, f"replay_buffer_rank{process_index}.json")
    if replay_buffer is not None and replay_buffer.size > 0 and os.path.exists(rb):
        with open(rb) as f:
            replay_buffer.load_state_dict(json.load(f))
    state_file = os.path.join(folder, STATE_FILE)
    if not os.path.exists(state_file):
        return {}
    with open(state_file) as f:
        return json.load(f)
