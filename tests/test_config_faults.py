"""Bad config: one clear line for a missing model path, a hub name without network, custom
code that was not trusted, and impossible combinations."""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

import pytest
import torch

from lora_dpo import hub
from lora_dpo.config import ModelConfig, TrainConfig, load_config
from lora_dpo.errors import ConfigError, DataError
from lora_dpo.model import load_base_model, load_tokenizer

CPU = torch.device("cpu")


def load_model(cfg: ModelConfig):
    return load_base_model(cfg, quantize=False, dtype=torch.float32, device=CPU)


@pytest.mark.parametrize(
    "override, message",
    [
        ("data.stric=true", r"unknown key 'data.stric' \(did you mean 'strict'\?\)"),
        ("data.strict=maybe", r"data.strict: expected true or false, got 'maybe'"),
        ("train.max_steps=0", r"train.max_steps=0: must be -1 \(all epochs\) or > 0"),
        ("data.max_pairs=-5", r"data.max_pairs=-5: must be >= 0"),
        ("train.eval_steps=10", r"train.eval_steps=10 needs an eval split: set data.eval_path"),
    ],
)
def test_bad_values_and_combinations_are_named(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_paged_optimizer_without_cuda_is_named():
    from lora_dpo.optim import build_optimizer

    params = [torch.nn.Parameter(torch.zeros(2))]
    with pytest.raises(ConfigError, match="train.optimizer=paged_adamw_8bit needs CUDA"):
        build_optimizer(params, TrainConfig(optimizer="paged_adamw_8bit"), CPU)
    assert isinstance(build_optimizer(params, TrainConfig(optimizer="auto"), CPU), torch.optim.AdamW)


@pytest.mark.parametrize(
    "name, message",
    [
        ("/no/such/model", "model.name_or_path='/no/such/model': no such directory"),
        ("./models/llama", "model.name_or_path='./models/llama': no such directory"),
        ("a/b/c", "model.name_or_path='a/b/c': no such directory"),
    ],
)
def test_missing_model_path_is_one_line_naming_it(name, message):
    for load in (load_tokenizer, load_model):
        with pytest.raises(ConfigError) as caught:
            load(ModelConfig(name_or_path=name))
        assert str(caught.value) == message


def test_a_file_or_an_empty_directory_is_one_line_naming_it(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ConfigError, match="a file, not a model directory"):
        load_tokenizer(ModelConfig(name_or_path=str(tmp_path / "weights.bin")))
    empty = tmp_path / "empty"
    empty.mkdir()
    for load in (load_tokenizer, load_model):
        with pytest.raises(ConfigError) as caught:
            load(ModelConfig(name_or_path=str(empty)))
        message = str(caught.value)
        assert "\n" not in message and message.startswith(f"model.name_or_path={str(empty)!r}: cannot load")


# ------------------------------------------------------------------------- trust_remote_code

CUSTOM_CODE = """import pathlib
pathlib.Path({marker!r}).write_text("executed")
from transformers import LlamaConfig, LlamaForCausalLM


class CustomConfig(LlamaConfig):
    model_type = "custom-llama"


class CustomModel(LlamaForCausalLM):
    config_class = CustomConfig
"""


def test_repository_code_runs_only_when_trusted(demo_workdir, tmp_path):
    model_dir = tmp_path / "custom"
    shutil.copytree(demo_workdir / "model", model_dir)
    marker = tmp_path / "code-was-executed"
    settings = json.loads((model_dir / "config.json").read_text())
    settings["model_type"] = "custom-llama"
    settings["auto_map"] = {
        "AutoConfig": "custom_code.CustomConfig",
        "AutoModelForCausalLM": "custom_code.CustomModel",
    }
    (model_dir / "config.json").write_text(json.dumps(settings))
    (model_dir / "custom_code.py").write_text(CUSTOM_CODE.format(marker=str(marker)))

    cfg = ModelConfig(name_or_path=str(model_dir))
    assert cfg.trust_remote_code is False  # the default
    with pytest.raises(ConfigError) as caught:
        load_model(cfg)
    assert str(caught.value) == (
        f"model.name_or_path={str(model_dir)!r}: the repository ships its own Python code, which "
        "runs only with model.trust_remote_code=true (set it only if you trust that code)"
    )
    load_tokenizer(cfg)  # its tokenizer needs no code
    assert not marker.exists()
    # The control: asked for, the same code does run (so the check above could fail).
    load_model(ModelConfig(name_or_path=str(model_dir), trust_remote_code=True))
    assert marker.read_text() == "executed"


# ------------------------------------------------------------------------------ no network


@pytest.fixture
def hub_unreachable(monkeypatch, tmp_path):
    """Online mode, with the Hub at a port where nothing listens and an empty local cache."""
    import datasets
    import huggingface_hub

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hub, "_reachable", {})
    for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    return tmp_path / "hub"


def put_in_hub_cache(cache: Path, repo: str, files: Path) -> None:
    """Lay out `files` the way huggingface_hub's cache holds a downloaded model repository."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    folder = cache / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)
    shutil.copytree(files, folder / "snapshots" / commit)


def test_hub_name_without_network_is_one_quick_line(hub_unreachable, caplog):
    caplog.set_level(logging.INFO)
    started = time.perf_counter()
    with pytest.raises(ConfigError) as caught:
        load_tokenizer(ModelConfig(name_or_path="someone/not-downloaded"))
    elapsed = time.perf_counter() - started
    message = str(caught.value)
    assert message == (
        "model.name_or_path='someone/not-downloaded': not a local directory and not in the local "
        "Hugging Face cache, and the Hugging Face Hub cannot be reached (127.0.0.1:9, no network?); "
        "download it where there is network, or give a local directory"
    )
    assert elapsed < 10, elapsed  # without the check: half a minute of retries
    assert "Retrying" not in caplog.text and "thrown while requesting" not in caplog.text
    with pytest.raises(ConfigError, match="cannot be reached"):
        load_model(ModelConfig(name_or_path="someone/not-downloaded"))
    from lora_dpo.sources import read_source

    with pytest.raises(DataError) as caught:
        read_source("someone/preference-set")
    assert "\n" not in str(caught.value) and "cannot be reached (127.0.0.1:9" in str(caught.value)
    assert time.perf_counter() - started < 20


def test_hub_model_in_the_local_cache_loads_without_network(hub_unreachable, demo_workdir):
    put_in_hub_cache(hub_unreachable, "someone/tiny-llama", demo_workdir / "model")
    cfg = ModelConfig(name_or_path="someone/tiny-llama")
    tokenizer = load_tokenizer(cfg)
    assert hub.offline_mode()  # switched by the connect check, not by the user
    assert tokenizer("Hello")["input_ids"]
    model = load_model(cfg)
    assert model.config.model_type == "llama"
