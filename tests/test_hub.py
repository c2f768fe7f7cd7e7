"""One rule tells a Hub name from a local path, for the model and for merge's base."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from lora_dpo.config import ModelConfig
from lora_dpo.errors import ConfigError
from lora_dpo.hub import looks_like_hub_name
from lora_dpo.merge import find_adapter
from lora_dpo.model import load_tokenizer


def write_adapter(adapter, base: str) -> None:
    """A minimal LoRA adapter directory recording `base` (one q_proj pair of factors)."""
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "base_model_name_or_path": base})
    )
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    save_file(
        {f"{prefix}.lora_A.weight": torch.zeros(4, 8), f"{prefix}.lora_B.weight": torch.zeros(8, 4)},
        str(adapter / "adapter_model.safetensors"),
    )


HUB_NAMES = ["gpt2", "meta-llama/Llama-3.1-8B", "Qwen/Qwen2.5-7B-Instruct"]
LOCAL_PATHS = [
    "/models/llama",
    "./llama",
    "../llama",
    "~/llama",
    ".cache/llama",
    "models/llama/8b",
    "models\\llama",
]


@pytest.mark.parametrize("name", HUB_NAMES)
def test_hub_names(name):
    assert looks_like_hub_name(name)


@pytest.mark.parametrize("path", LOCAL_PATHS)
def test_local_paths(path):
    assert not looks_like_hub_name(path)


@pytest.mark.parametrize("path", LOCAL_PATHS)
def test_a_missing_local_path_is_named_before_any_hub_lookup(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative paths resolve where nothing exists
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(ConfigError, match=r"no such directory$"):
        load_tokenizer(ModelConfig(name_or_path=path))
    adapter = tmp_path / "adapter"
    write_adapter(adapter, path)
    with pytest.raises(ConfigError, match=r"no such directory; give the base model with --base$"):
        find_adapter(adapter)


def test_merge_takes_a_hub_name_as_the_base(tmp_path):
    adapter = tmp_path / "adapter"
    write_adapter(adapter, "gpt2")
    assert find_adapter(adapter).base == "gpt2"
    assert find_adapter(adapter, base="someone/tiny-llama").base == "someone/tiny-llama"
