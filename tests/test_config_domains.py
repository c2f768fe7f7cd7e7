"""Every numeric setting has a domain, checked at config load: an out-of-domain value (negative,
zero where it means nothing, inf, nan) is one `error:` line from the CLI naming key, value and
domain, before any model work; the edges of each domain are accepted. YAML 1.2 floats (`5e-5`)
are floats."""

from __future__ import annotations

import dataclasses
import math
import subprocess
import sys
import typing

import pytest

from lora_dpo.cli import main
from lora_dpo.config import SECTIONS, Config, config_from_dict, dump_config, load_config
from lora_dpo.errors import ConfigError

BAD_FLOATS = (".inf", "-.inf", ".nan")

# key: (domain as the error states it, out-of-domain values, in-domain edge values). Written out
# here rather than read back from config.py, so the test states the contract on its own.
DOMAINS: dict[str, tuple[str, tuple[str, ...], tuple[str, ...]]] = {
    "lora.r": ("> 0", ("0", "-1", ".inf"), ("1",)),
    "lora.alpha": ("> 0", ("0", "-16"), ("1",)),
    "lora.dropout": ("in [0, 1)", ("-0.1", "1", "1.0", *BAD_FLOATS), ("0", "0.999")),
    "data.max_length": ("> 0", ("0", "-1"), ("2",)),
    "data.max_prompt_length": ("> 0", ("0", "-5"), ("1",)),
    "data.max_pairs": (">= 0", ("-1", "-5"), ("0", "1")),
    "data.max_row_bytes": ("> 0", ("0", "-1", ".inf"), ("1", "9223372036854775807")),
    "precompute.batch_size": ("> 0", ("0", "-8"), ("1",)),
    "precompute.shard_size": ("> 0", ("0", "-1"), ("1",)),
    "precompute.max_tokens_per_batch": (">= 0", ("-1",), ("0", "1")),
    "train.beta": ("> 0 and finite", ("0", "-0.1", *BAD_FLOATS), ("1e-12", "1000")),
    "train.label_smoothing": ("in [0, 0.5)", ("-0.01", "0.5", "1", *BAD_FLOATS), ("0", "0.49")),
    "train.rpo_alpha": (">= 0 and finite", ("-1", "-1e-9", *BAD_FLOATS), ("0", "1")),
    "train.ld_alpha": ("in [0, 1]", ("-0.1", "1.5", *BAD_FLOATS), ("0", "1")),
    "train.f_alpha_divergence_coef": ("in [0, 1]", ("-0.5", "1.01", *BAD_FLOATS), ("0", "1")),
    "train.discopop_tau": ("> 0 and finite", ("0", "-0.05", *BAD_FLOATS), ("1e-6", "10")),
    "train.simpo_gamma": (">= 0 and finite", ("-0.5", *BAD_FLOATS), ("0", "3")),
    "train.cpo_alpha": (">= 0 and finite", ("-1", *BAD_FLOATS), ("0", "2")),
    "train.desirable_weight": (">= 0 and finite", ("-1", *BAD_FLOATS), ("0", "1.33")),
    "train.undesirable_weight": (">= 0 and finite", ("-1", *BAD_FLOATS), ("0", "2")),
    "train.learning_rate": ("> 0 and finite", ("0", "-5e-5", *BAD_FLOATS), ("1e-10", "1")),
    "train.per_device_batch_size": ("> 0", ("0", "-1"), ("1",)),
    "train.gradient_accumulation_steps": ("> 0", ("0", "-4"), ("1",)),
    "train.epochs": ("> 0", ("0", "-1"), ("1",)),
    "train.max_steps": ("-1 (all epochs) or > 0", ("0", "-2", "-100"), ("-1", "1")),
    "train.warmup_ratio": ("in [0, 1]", ("-0.1", "1.01", "2", *BAD_FLOATS), ("0", "1")),
    "train.weight_decay": (">= 0 and finite", ("-5", "-0.01", *BAD_FLOATS), ("0", "0.1")),
    "train.max_grad_norm": (
        "none (no clipping) or > 0 and finite",
        ("0", "-1", "-0.5", *BAD_FLOATS),
        ("1e-6", "none", "null"),
    ),
    "train.logits_chunk_size": ("> 0", ("0", "-512"), ("1",)),
    "train.max_tokens_per_batch": (">= 0", ("-1",), ("0", "4096")),
    "train.logging_steps": ("> 0", ("0", "-10"), ("1",)),
    "train.save_steps": (">= 0", ("-1", "-100"), ("0", "1")),
    "train.save_total_limit": ("> 0", ("0", "-2"), ("1",)),
    "train.max_consecutive_skips": ("> 0", ("0", "-5"), ("1",)),
    "train.eval_steps": (">= 0", ("-1",), ("0",)),
    "train.generate_every": (">= 0", ("-1",), ("0",)),
    "train.generate_prompts": ("> 0", ("0", "-4"), ("1",)),
    "train.generate_max_new_tokens": ("> 0", ("0", "-1"), ("1",)),
    "train.seed": ("in [0, 4294967295]", ("-1", "4294967296"), ("0", "4294967295")),
}
# An edge value that only makes sense with another key moved out of its way.
COMPANIONS = {
    "data.max_length": ["data.max_prompt_length=1"],
    "train.label_smoothing": ["train.loss_type=robust"],
    "train.f_alpha_divergence_coef": ["train.f_divergence_type=alpha_divergence"],
    "train.discopop_tau": ["train.loss_type=discopop"],
    "train.simpo_gamma": ["train.loss_type=simpo"],
    "train.cpo_alpha": ["train.loss_type=cpo"],
    "train.desirable_weight": ["train.loss_type=kto"],
    "train.undesirable_weight": ["train.loss_type=kto"],
}


def numeric_keys() -> set[str]:
    keys = set()
    for name, section in SECTIONS.items():
        hints = typing.get_type_hints(section)
        for f in dataclasses.fields(section):
            types = {hints[f.name], *typing.get_args(hints[f.name])}
            if types & {int, float} and bool not in types:
                keys.add(f"{name}.{f.name}")
    return keys


def test_every_numeric_key_has_its_domain_stated_here():
    assert set(DOMAINS) == numeric_keys()


def error_lines(capsys, argv: list[str]) -> tuple[int, list[str]]:
    code = main(argv)
    captured = capsys.readouterr()
    return code, [line for line in captured.err.splitlines() if line.strip()]


CASES = [(key, value) for key, (_, bad, _) in DOMAINS.items() for value in bad]


def float_typed(key: str) -> bool:
    section, name = key.split(".")
    hint = typing.get_type_hints(SECTIONS[section])[name]
    return float in {hint, *typing.get_args(hint)}


def parsed(value: str) -> float:
    return {".inf": math.inf, "-.inf": -math.inf, ".nan": math.nan}.get(value) or float(value)


@pytest.mark.parametrize("key, value", CASES, ids=[f"{k}={v}" for k, v in CASES])
def test_out_of_domain_value_is_one_error_line(capsys, key, value):
    code, lines = error_lines(capsys, ["data", "check", f"{key}={value}"])
    assert code == 2, lines
    if float_typed(key):
        expected = f"error: {key}={parsed(value)!r}: must be {DOMAINS[key][0]}"
    elif value.startswith(("-.", ".")):  # inf or nan for an integer
        expected = f"error: {key}: expected int, got float {parsed(value)!r}"
    else:
        expected = f"error: {key}={int(value)}: must be {DOMAINS[key][0]}"
    assert lines == [expected]


@pytest.mark.parametrize("key", sorted(DOMAINS))
def test_domain_edges_are_accepted(key):
    for value in DOMAINS[key][2]:
        config = load_config(None, [*COMPANIONS.get(key, []), f"{key}={value}"])
        section, name = key.split(".")
        got = getattr(getattr(config, section), name)
        if value in ("none", "null"):
            assert got is None
        else:
            assert got == (parsed(value) if float_typed(key) else int(value)), (key, value, got)


def test_train_refuses_before_any_model_work_in_a_real_process(tmp_path):
    """The faults first found: gradient ascent, zeroed gradients, inf beta, negative weight decay,
    no LoRA target. Each is refused by `lora-dpo train` with no model path set: the config is
    checked before anything else is looked at."""
    for override, message in [
        (
            "train.max_grad_norm=-1",
            "error: train.max_grad_norm=-1.0: must be none (no clipping) or > 0 and finite",
        ),
        (
            "train.max_grad_norm=0",
            "error: train.max_grad_norm=0.0: must be none (no clipping) or > 0 and finite",
        ),
        ("train.beta=.inf", "error: train.beta=inf: must be > 0 and finite"),
        ("train.learning_rate=.inf", "error: train.learning_rate=inf: must be > 0 and finite"),
        ("train.weight_decay=-5", "error: train.weight_decay=-5.0: must be >= 0 and finite"),
        ("lora.target_modules=", "error: lora.target_modules=[]: name at least one module, or all-linear"),
    ]:
        result = subprocess.run(
            [sys.executable, "-m", "lora_dpo.cli", "train", f"train.output_dir={tmp_path / 'run'}", override],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 2, result.stderr
        assert result.stderr.strip().splitlines() == [message]
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------ YAML floats


def test_yaml_1_2_floats_in_a_file_are_floats(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        "train:\n  learning_rate: 5e-5\n  beta: 1E-1\n  weight_decay: 1e-2\n  rpo_alpha: '+2.'\n"
        "lora:\n  dropout: .5e-1\n"
    )
    config = load_config(path)
    assert config.train.learning_rate == 5e-5 and isinstance(config.train.learning_rate, float)
    assert (config.train.beta, config.train.weight_decay, config.train.rpo_alpha) == (0.1, 0.01, 2.0)
    assert config.lora.dropout == 0.05


@pytest.mark.parametrize(
    "text, message",
    [
        ("train:\n  learning_rate: 5e-5x\n", "train.learning_rate: expected float, got str '5e-5x'"),
        ("train:\n  learning_rate: fast\n", "train.learning_rate: expected float, got str 'fast'"),
        (
            "train:\n  max_grad_norm: .inf\n",
            "train.max_grad_norm=inf: must be none (no clipping) or > 0 and finite",
        ),
        ("train:\n  beta: 1e400\n", "train.beta=inf: must be > 0 and finite"),
        ("train:\n  epochs: 1e3\n", "train.epochs: expected int, got str '1e3'"),
    ],
)
def test_non_numbers_and_non_finite_floats_stay_errors(tmp_path, text, message):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert message in str(caught.value)


def test_yaml_1_2_floats_as_overrides():
    config = load_config(None, ["train.learning_rate=1e-4", "train.beta=2e-1", "train.warmup_ratio=5E-2"])
    assert (config.train.learning_rate, config.train.beta, config.train.warmup_ratio) == (1e-4, 0.2, 0.05)
    with pytest.raises(ConfigError, match="train.beta: expected float, got str 'e-4'"):
        load_config(None, ["train.beta=e-4"])


def test_huge_integers_are_one_line():
    with pytest.raises(ConfigError, match="train.beta: a 400-digit number is too large for a float"):
        load_config(None, ["train.beta=" + "9" * 400])
    with pytest.raises(
        ConfigError, match=r"train.epochs: a 20-digit number is too large \(64-bit integers at most\)"
    ):
        load_config(None, ["train.epochs=" + "9" * 20])


def test_clipping_off_round_trips_through_the_saved_config(tmp_path):
    config = load_config(None, ["train.max_grad_norm=none"])
    assert config.train.max_grad_norm is None
    saved = dump_config(config)
    assert "max_grad_norm: null" in saved
    import yaml

    assert config_from_dict(yaml.safe_load(saved)) == config
    path = tmp_path / "c.yaml"
    for spelled in ("none", "None", "null", "~"):
        path.write_text(f"train:\n  max_grad_norm: {spelled}\n")
        assert load_config(path).train.max_grad_norm is None
    assert Config().train.max_grad_norm == 1.0
