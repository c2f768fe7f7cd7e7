"""Config loading is strict, and every shipped config file loads."""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path

import pytest

import lora_dpo
from lora_dpo.config import Config, config_from_dict, dump_config, load_config
from lora_dpo.demo import demo_config
from lora_dpo.errors import ConfigError

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_config_loads_and_says_how_to_run_it(path: Path):
    config = load_config(path)
    assert config.model.name_or_path
    first_lines = path.read_text().splitlines()[:8]
    assert any(line.strip().startswith("#   lora-dpo ") for line in first_lines)


def test_demo_yaml_matches_the_demo_config():
    assert load_config(Path(__file__).resolve().parents[1] / "configs" / "demo.yaml") == demo_config(
        "runs/demo"
    )


def test_every_module_imports():
    names = [m.name for m in pkgutil.walk_packages(lora_dpo.__path__, "lora_dpo.")]
    for name in names + ["precompute"]:
        importlib.import_module(name)


def test_overrides_are_typed(tmp_path):
    config = load_config(
        None,
        [
            "train.beta=0.05",
            "train.epochs=3",
            "lora.target_modules=q_proj,v_proj",
            "train.learning_rate=1",
            "model.name_or_path=/m",
        ],
    )
    assert config.train.beta == 0.05 and config.train.epochs == 3
    assert config.lora.target_modules == ["q_proj", "v_proj"]
    assert config.train.learning_rate == 1.0 and isinstance(config.train.learning_rate, float)


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.bta=0.1", r"unknown key 'train.bta' \(did you mean 'beta'\?\)"),
        ("trian.beta=0.1", r"unknown key 'trian.beta' \(did you mean 'train'\?\)"),
        ("train.epochs=two", r"train.epochs: expected int, got str 'two'"),
        ("train.epochs=1.5", r"train.epochs: expected int, got float 1.5"),
        ("train.gradient_checkpointing=1", r"expected true or false"),
        ("train.beta", r"expected key=value"),
        ("train.optimizer=sgd", r"train.optimizer='sgd': must be one of"),
        ("train.beta=0", r"train.beta=0.0: must be > 0"),
        ("data.max_prompt_length=4096", r"max_prompt_length=4096 must be smaller than data.max_length=1024"),
    ],
)
def test_bad_overrides_name_the_key(override: str, message: str):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_unknown_key_in_file_names_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  learning_rat: 0.1\n")
    with pytest.raises(
        ConfigError, match=r"c.yaml: unknown key 'train.learning_rat' \(did you mean 'learning_rate'\?\)"
    ):
        load_config(path)


def test_saved_config_round_trips():
    config = demo_config("runs/demo")
    import yaml

    assert config_from_dict(yaml.safe_load(dump_config(config))) == config
    assert Config() == load_config(None)


def test_readme_documents_every_config_key():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    import dataclasses

    for section, cls in (
        ("model", Config().model),
        ("lora", Config().lora),
        ("data", Config().data),
        ("precompute", Config().precompute),
        ("train", Config().train),
    ):
        for f in dataclasses.fields(cls):
            assert f"`{section}.{f.name}`" in readme, f"{section}.{f.name} missing from README"
