"""Bad config: one clear line for a missing model path, a hub name without network, custom
code that was not trusted, impossible combinations, a config file that cannot be read or
parsed, and LoRA target modules the model does not have."""

from __future__ import annotations

import json
import logging
import os
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


# ------------------------------------------------------------------------- the config file


def cli_error(capsys, argv: list[str]) -> str:
    from lora_dpo.cli import main

    code = main(argv)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, lines
    return lines[0]


def test_config_file_faults_are_one_line_naming_the_file(tmp_path, capsys):
    def check(path: Path) -> str:
        return cli_error(capsys, ["data", "check", "--config", str(path)])

    assert check(tmp_path) == f"error: {tmp_path}: a directory, not a config file"
    assert check(tmp_path / "none.yaml") == f"error: config file not found: {tmp_path / 'none.yaml'}"
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes("train:\n  output_dir: runs/caf\xe9\n".encode("latin-1"))
    assert check(latin1) == f"error: {latin1}: not UTF-8: byte 0xe9 at byte offset 29"
    broken = tmp_path / "broken.yaml"
    broken.write_text("train:\n  beta: 0.1\n   epochs: 2\n")
    assert check(broken) == (
        f"error: {broken}: line 3, column 10: not valid YAML: mapping values are not allowed here"
    )
    unclosed = tmp_path / "unclosed.yaml"
    unclosed.write_text("lora:\n  target_modules: [q_proj, v_proj\ntrain:\n  beta: 0.1\n")
    assert check(unclosed).startswith(f"error: {unclosed}: line 3, column 6: not valid YAML: expected ','")
    control = tmp_path / "control.yaml"
    control.write_text("train:\n  beta: 0.1\x07\n")
    assert check(control) == (
        f"error: {control}: line 2, column 12: not valid YAML: character U+0007 is not allowed"
    )
    if Path("/proc/self/mem").is_file():  # a regular file whose read fails (even for root)
        assert check(Path("/proc/self/mem")) == "error: /proc/self/mem: cannot read: Input/output error"
    if os.geteuid() != 0:  # root reads a file whatever its mode
        locked = tmp_path / "locked.yaml"
        locked.write_text("train:\n  beta: 0.1\n")
        locked.chmod(0)
        assert check(locked) == f"error: {locked}: cannot read: Permission denied"


def test_a_config_file_with_a_bom_and_an_empty_section_loads(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_bytes(b"\xef\xbb\xbftrain:\n  beta: 0.2\nlora:\n")
    assert load_config(path).train.beta == 0.2


# ----------------------------------------------------------------------- LoRA target modules


@pytest.fixture(scope="module")
def tiny_base(demo_workdir):
    return ModelConfig(name_or_path=str(demo_workdir / "model"))


@pytest.mark.parametrize(
    "targets, message",
    [
        (["q_prj"], "lora.target_modules: 'q_prj' matches no module of the model; closest: q_proj"),
        (["q_proj", "v_prj"], "lora.target_modules: 'v_prj' matches no module of the model; closest: v_proj"),
        (
            ["mlp.gate"],
            "lora.target_modules: 'mlp.gate' matches no module of the model; closest: mlp.gate_proj",
        ),
        (
            ["attention"],
            (
                "lora.target_modules: 'attention' matches no module of the model; its linear "
                "layers: down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj"
            ),
        ),
    ],
)
def test_misspelled_lora_target_is_named_with_the_closest_names(tiny_base, targets, message):
    from lora_dpo.config import LoraConfig
    from lora_dpo.model import attach_lora

    model = load_model(tiny_base)
    with pytest.raises(ConfigError) as caught:
        attach_lora(model, LoraConfig(target_modules=targets), gradient_checkpointing=False)
    assert str(caught.value).split("; ")[0] == message.split("; ")[0]
    assert str(caught.value).split("; ")[1].startswith(message.split("; ")[1])
    assert not any("lora_" in name for name, _ in model.named_modules())  # nothing was attached


def test_lora_targets_match_like_peft(tiny_base):
    """Leaf names, dotted tails and full names all reach peft, which wraps what they name."""
    from lora_dpo.config import LoraConfig
    from lora_dpo.model import attach_lora

    for targets, wrapped in [
        (["q_proj", "v_proj"], 4),
        (["self_attn.o_proj"], 2),
        (["model.layers.1.mlp.up_proj"], 1),
        (["lm_head"], 1),
    ]:
        policy = attach_lora(
            load_model(tiny_base), LoraConfig(target_modules=targets), gradient_checkpointing=False
        )
        names = [
            name for name, module in policy.named_modules() if hasattr(module, "lora_A") and module.lora_A
        ]
        assert len(names) == wrapped, (targets, names)


def test_empty_lora_targets_are_refused_at_config_load():
    with pytest.raises(
        ConfigError, match=r"lora.target_modules=\[\]: name at least one module, or all-linear"
    ):
        load_config(None, ["lora.target_modules="])
    with pytest.raises(ConfigError, match="all-linear already covers every linear layer"):
        load_config(None, ["lora.target_modules=all-linear,q_proj"])
