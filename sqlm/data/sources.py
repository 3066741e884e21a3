"""Where the rows come from: one split of a local file, a ``save_to_disk`` folder or a hub id
(:func:`load_split`), and the training and evaluation sets of a recipe (:func:`load_train_eval`), with
one-line errors that name the file."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..errors import SqlmError
from .formats import nonempty
from .holdout import check_hold_out, hold_out


_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


def _resolve_path(name: str, base_dir: str | os.PathLike | None) -> Path | None:
    p = Path(name).expanduser()
    if p.exists():
        return p
    if base_dir is not None and not p.is_absolute() and (Path(base_dir) / p).exists():
        return Path(base_dir) / p
    return None


def one_line(e: BaseException) -> str:
    """The most specific message of an exception chain, on one line (``datasets`` wraps the parser's
    error, e.g. "JSON parse error: ... in row 3", in a generic one)."""
    msgs, first = [], type(e).__name__
    while e is not None and len(msgs) < 5:
        text = " ".join(str(e).split())
        if text:
            msgs.append(f"{type(e).__name__}: {text}")
        e = e.__cause__
    return msgs[-1] if msgs else first


def check_utf8(path: str | os.PathLike, chunk_size: int = 1 << 20) -> None:
    """Raise a :class:`SqlmError` naming the file, line and byte when a text data file is not UTF-8
    (``datasets`` would load it and fail later, when the bad row is read)."""
    import codecs

    decoder = codecs.getincrementaldecoder("utf-8")()
    line, offset = 1, 0
    with open(path, "rb") as f:
        while True:
            chunk = f.read(chunk_size)
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as e:
                pos = e.start
                at = line + chunk.count(b"\n", 0, pos)
                raise SqlmError(
                    f"dataset file {path} is not UTF-8 text: byte 0x{chunk[pos]:02x} at line {at} "
                    f"(byte offset {offset + pos}); re-encode it as UTF-8"
                ) from None
            if not chunk:
                return
            line += chunk.count(b"\n")
            offset += len(chunk)


def _looks_like_path(name: str) -> bool:
    return Path(name).suffix in _FILE_BUILDERS or name.startswith((".", "/", "~"))


def _is_saved_dataset(path: Path | None) -> bool:
    """A folder written by ``datasets``' ``save_to_disk``."""
    return (
        path is not None
        and path.is_dir()
        and any((path / f).is_file() for f in ("dataset_dict.json", "dataset_info.json"))
    )


def _is_train_split(split: str | None) -> bool:
    """``train`` or a slice of it (``train[:90%]``): the only split a single data file has."""
    return not split or split == "train" or split.startswith("train[")


def _json_messages(value: Any) -> list | None:
    """``value`` parsed as a JSON list of ``{role, content}`` messages, or None when it is not one."""
    if not isinstance(value, str) or not value.lstrip().startswith("["):
        return None
    try:
        out = json.loads(value)
    except json.JSONDecodeError:
        return None
    if isinstance(out, list) and out and all(isinstance(m, dict) and "role" in m and "content" in m for m in out):
        return out
    return None


def decode_message_columns(dataset, where: str):
    """Parse the text columns whose cells are JSON-encoded lists of ``{role, content}`` messages (how
    a CSV file holds conversations) into lists of messages, so they go through the chat template
    instead of training as raw JSON text. A column that holds messages in some rows and other text in
    others is an error naming both rows."""
    from datasets import Value

    for col in list(dataset.column_names):
        feature = dataset.features[col]
        if not (isinstance(feature, Value) and feature.dtype in ("string", "large_string")):
            continue
        values = dataset[col]
        decoded = [_json_messages(v) for v in values]
        hits = [i for i, d in enumerate(decoded) if d is not None]
        if not hits:
            continue
        misses = [i for i, (v, d) in enumerate(zip(values, decoded)) if d is None and nonempty(v)]
        if misses:
            raise SqlmError(
                f"row {misses[0]} of {where}: column '{col}' is not a JSON list of {{role, content}} messages, "
                f"but row {hits[0]} is (conversations in a CSV file must be JSON-encoded in every row)"
            )
        order = dataset.column_names
        dataset = dataset.remove_columns(col).add_column(col, decoded).select_columns(order)
    return dataset


def _looked_in(base_dir: str | os.PathLike | None) -> str:
    return f" (looked in {os.getcwd()}" + (f" and beside the recipe, in {base_dir})" if base_dir else ")")


def _file_builder(path: Path, split: str | None, missing_ok: bool) -> str | None:
    """The ``datasets`` builder of a local data file, once the file is checked: a known extension, a
    split it has (``train``; with ``missing_ok`` another split is None), not empty, UTF-8 text."""
    builder = _FILE_BUILDERS.get(path.suffix)
    if builder is None:
        raise SqlmError(f"dataset file {path} has an unknown extension; use one of {', '.join(_FILE_BUILDERS)}")
    if not _is_train_split(split):
        if missing_ok:
            return None
        raise SqlmError(
            f"unknown split '{split}' of dataset file {path}: a single file has one split, 'train'; name a "
            "held-out file as the split, or hold rows out with dataset_test_size"
        )
    if path.stat().st_size == 0:
        raise SqlmError(f"dataset file {path} is empty")
    if builder in ("json", "csv"):
        check_utf8(path)
    return builder


def load_split(
    name: str,
    split: str,
    config: str | None = None,
    base_dir: str | os.PathLike | None = None,
    missing_ok: bool = False,
):
    """Load one split with ``datasets``: a local .json/.jsonl/.parquet/.csv file, a folder written by
    ``save_to_disk``, another local folder, or a hub id. ``split`` may itself be a file path (e.g. a
    held-out jsonl). With ``missing_ok`` a split the dataset does not have is None, not an error.

    A single file has one split, ``train`` (or a slice of it such as ``train[:90%]``); any other split
    name is an error (hold rows out with :func:`hold_out` / ``dataset_test_size`` instead). In a CSV
    file, columns of JSON-encoded messages are parsed into conversations (:func:`decode_message_columns`).

    Errors are one line naming the file or id: a missing file, a file that is not UTF-8 or not valid
    JSON/CSV/Parquet, an unknown split (naming the splits that exist), a hub id that is neither local
    nor cached (with ``HF_HUB_OFFLINE=1``)."""
    import datasets

    split_path = _resolve_path(split, base_dir) if split else None
    if split_path is not None and split_path.suffix in _FILE_BUILDERS:
        name, split = str(split_path), "train"
    elif split and split_path is None and Path(split).suffix in _FILE_BUILDERS:
        raise SqlmError(f"could not load split file '{split}': no such file{_looked_in(base_dir)}")
    path = _resolve_path(name, base_dir)
    if path is None and _looks_like_path(name):
        raise SqlmError(f"could not load dataset '{name}': no such file or folder{_looked_in(base_dir)}")
    if path is not None and path.is_file():
        builder = _file_builder(path, split, missing_ok)
        if builder is None:
            return None
    try:
        if path is not None and path.is_file():
            ds = datasets.load_dataset(builder, data_files=str(path), split=split or "train")
            return decode_message_columns(ds, f"dataset file {path}") if builder == "csv" else ds
        if _is_saved_dataset(path):
            data = datasets.load_from_disk(str(path))
            if isinstance(data, datasets.Dataset):
                data = datasets.DatasetDict({"train": data})
            if split not in data:
                raise ValueError(f'Unknown split "{split}". Should be one of {list(data)}.')
            return data[split]
        if path is not None:
            return datasets.load_dataset(str(path), config, split=split)
        return datasets.load_dataset(name, config, split=split)
    except SqlmError:
        raise
    except Exception as e:  # offline hub misses, malformed files, unknown splits
        if missing_ok and isinstance(e, ValueError) and str(e).startswith("Unknown split"):
            return None
        what = f"dataset file {path}" if path is not None and path.is_file() else f"dataset '{name}'"
        hint = ""
        if path is None and os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
            hint = " (not a local path and not in the local hub cache; HF_HUB_OFFLINE is set)"
        raise SqlmError(f"could not load split '{split}' of {what}{hint}: {one_line(e)}") from None


def take_first(ds, limit: int | None):
    """The first ``limit`` rows of ``ds`` (all with None; None stays None)."""
    return ds if ds is None or limit is None else ds.select(range(min(limit, len(ds))))


def load_train_eval(args, base_dir: str | None = None, optional_test_split: bool = False):
    """``(train, eval or None)`` from a config's ``dataset_name``, ``dataset_config``,
    ``dataset_train_split`` / ``dataset_test_split``, ``dataset_test_size`` (rows held out of the
    training split when there is no test split) and ``max_train_samples`` / ``max_eval_samples``
    (sqlm train, sqlm dpo and sqlm reward read their data through this one function). The held-out
    rows are drawn before the sample limits, so the two sets never share a row.

    With ``optional_test_split`` a test split the dataset lacks means no evaluation data; then an
    ``eval_fraction`` > 0 in ``args`` (``sqlm reward``'s key) holds out that fraction of the train
    split with ``datasets``' ``train_test_split`` (seed 0)."""
    test_size = getattr(args, "dataset_test_size", None)
    train = load_split(args.dataset_name, args.dataset_train_split, args.dataset_config, base_dir)
    check_hold_out(test_size, args.dataset_test_split)
    evals = None
    if args.dataset_test_split:
        evals = load_split(
            args.dataset_name, args.dataset_test_split, args.dataset_config, base_dir, missing_ok=optional_test_split
        )
    elif test_size is not None:
        train, evals = hold_out(train, test_size)
    fraction = getattr(args, "eval_fraction", 0.0) or 0.0
    if evals is None and fraction > 0:
        parts = train.train_test_split(test_size=fraction, seed=0)
        train, evals = parts["train"], parts["test"]
    return take_first(train, args.max_train_samples), take_first(evals, args.max_eval_samples)
