"""Typed run configuration: dataclasses with defaults, YAML files, strict `key=value` overrides.

A config file has one mapping per section (`model`, `lora`, `data`, `precompute`, `train`);
overrides on the command line use dotted keys: `train.beta=0.05 data.max_length=2048`.
Unknown keys and wrong types are errors that name the key (and suggest the closest one),
never silently ignored. Every numeric and choice key declares its domain beside its default
(`setting(default, domain)`), and `Config.validate` checks each one at load, before any model
work: one line naming the key, the value and the domain.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lora_dpo.config_file import read_config_file
from lora_dpo.domains import DOMAIN, above, at_least, between, one_of, setting
from lora_dpo.errors import ConfigError


@dataclass
class ModelConfig:
    # Local directory or hub name of a causal LM; the policy's base and, by default, the reference.
    name_or_path: str = ""
    # "nf4": 4-bit NormalFloat with double quantization (QLoRA). "none": plain weights in `dtype`.
    quantization: str = setting("nf4", one_of("nf4", "none"))
    # Compute dtype: "auto" picks bf16 on a GPU with native bf16, else fp16 (loss-scaled), and
    # fp32 on the CPU (bf16 matmuls are slow there).
    dtype: str = setting("auto", one_of("auto", "fp32", "bf16", "fp16"))
    # Executing a repository's own Python code is opt-in.
    trust_remote_code: bool = False
    # A PEFT LoRA adapter trained on this base (an SFT run, say) to start DPO from: the
    # reference is then base + this adapter (its weights are in the cache identity). Empty: none.
    adapter_path: str = ""
    # With adapter_path: "continue" trains that adapter on (lora.* is then its own); "stack"
    # keeps it frozen and trains a new lora.* adapter on top. Either way without its dropout,
    # so the step-0 policy is the reference exactly.
    adapter_mode: str = setting("continue", one_of("continue", "stack"))


@dataclass
class LoraConfig:
    r: int = setting(16, above(0))
    alpha: int = setting(32, above(0))
    dropout: float = setting(0.05, between(0, 1, high_open=True))
    # "all-linear" targets every linear layer except the LM head (QLoRA paper: all layers matter).
    # Names are matched against the model's modules before LoRA is attached.
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])


@dataclass
class DataConfig:
    # .jsonl / .json / .jsonl.gz / .parquet / .csv, a `save_to_disk` directory, or a hub name.
    train_path: str = ""
    # Held-out pairs for evaluation; empty means no eval split.
    eval_path: str = ""
    # Split to take from a hub data set or a DatasetDict directory.
    train_split: str = "train"
    eval_split: str = "test"
    # "auto" detects the format from the first row: explicit / implicit / conversational pairs,
    # or unpaired / unpaired_conversational rows (prompt, completion, label) for KTO.
    format: str = setting(
        "auto",
        one_of("auto", "explicit", "implicit", "conversational", "unpaired", "unpaired_conversational"),
    )
    # Longest prompt + response, in tokens; longer pairs are cut (prompt from the left first).
    max_length: int = setting(1024, above(0))
    max_prompt_length: int = setting(512, above(0))
    # Keep at most this many pairs (0 = all): for quick trials on a slice.
    max_pairs: int = setting(0, at_least(0))
    # A row longer than this (its JSON Lines line, or its text in other formats) is dropped as
    # row_too_large before it is parsed or tokenized: one runaway row must not cost gigabytes.
    # 8 MiB is far above any transcript a model with a 128k context can take.
    max_row_bytes: int = setting(8 * 2**20, above(0))
    # A row that cannot become a pair (bad JSON line, missing field, empty response, ...) is
    # dropped and counted by reason in the data report, so one bad line among millions does
    # not stop a run; true makes the first such row an error naming its file, line and field.
    strict: bool = False


@dataclass
class PrecomputeConfig:
    # Where the reference cache (manifest.json + shard-*.safetensors) lives.
    cache_dir: str = "runs/ref-cache"
    # Pairs per reference forward (no gradients: larger than the training batch is fine).
    batch_size: int = setting(8, above(0))
    # Pairs per safetensors shard: a shard is the unit of resume after an interruption.
    shard_size: int = setting(4096, above(0))
    # "policy": the same quantized base the policy starts from (step-0 loss is exactly ln 2).
    # "bf16" / "fp32": an unquantized reference, an explicit choice recorded in the manifest.
    reference: str = setting("policy", one_of("policy", "bf16", "fp32"))
    # Decoder tokens per reference forward, as train.max_tokens_per_batch (0: batch_size pairs).
    # Eval, in training and in `lora-dpo eval`, scores in batches of these settings too.
    max_tokens_per_batch: int = setting(0, at_least(0))


@dataclass
class TrainConfig:
    output_dir: str = "runs/train"
    # A finished run (output_dir/adapter) is never replaced unless this is set.
    overwrite_output_dir: bool = False
    beta: float = setting(0.1, above(0))
    # TRL's names, so settings carry over: "sigmoid" (DPO), "ipo" (length-normalised, targets a
    # margin of 1/(2β) instead of an unbounded one), "hinge" (SLiC), "robust" (rDPO), and the
    # rest of TRL's DPO list (lora_dpo.losses.LOSS_TYPES). Several DPO loss types at once (TRL's
    # list loss_type=[a, b]) are joined with "+": "sigmoid+bco_pair+sft" (MPO). The
    # reference-free "simpo", "orpo" and "cpo" stand alone and need no reference cache; "kto"
    # reads unpaired rows (prompt, completion, label) or splits pairs into them.
    loss_type: str = "sigmoid"
    # Probability that a preference label is flipped: cDPO on "sigmoid", rDPO's ε on "robust",
    # EXO's ε on "exo_pair" (which needs it > 0). 0 trusts every label. Must be < 0.5 (at 0.5
    # the labels carry no information).
    label_smoothing: float = setting(0.0, between(0, 0.5, high_open=True))
    # Weight of the RPO term, the NLL of the chosen response (TRL's rpo_alpha; the RPO paper
    # uses 1.0). 0 turns it off: plain preference optimisation can lower chosen likelihoods too.
    rpo_alpha: float = setting(0.0, at_least(0))
    # One weight per loss type joined in loss_type (TRL's loss_weights; MPO: [0.8, 0.2, 1.0]),
    # each >= 0. None: every loss type weighs 1.
    loss_weights: list[float] | None = None
    # LD-DPO's α in [0, 1]: response tokens past the pair's shared length min(|yw|, |yl|) count
    # with this weight, so verbosity earns less reward. 1.0 is plain DPO (TRL's ld_alpha=None).
    ld_alpha: float = setting(1.0, between(0, 1))
    # WPO: weight each pair by how likely the policy is to generate it (TRL's use_weighting), so
    # off-policy pairs count less.
    use_weighting: bool = False
    # f-DPO's regulariser: "reverse_kl" (DPO's), "forward_kl", "js_divergence" or
    # "alpha_divergence" with f_alpha_divergence_coef (1 is reverse KL, 0 forward KL). Checked,
    # with every combination of loss settings, by lora_dpo.losses.LossSettings.problem.
    f_divergence_type: str = "reverse_kl"
    f_alpha_divergence_coef: float = setting(0.5, between(0, 1))
    # DiscoPOP's temperature τ, the paper's value (loss_type="discopop").
    discopop_tau: float = setting(0.05, above(0))
    # SimPO's target reward margin γ (loss_type="simpo"; TRL's simpo_gamma).
    simpo_gamma: float = setting(0.5, at_least(0))
    # Weight of CPO's chosen NLL term (loss_type="cpo"; TRL's CPOConfig default).
    cpo_alpha: float = setting(1.0, at_least(0))
    # KTO's weights of the desirable and undesirable rows' losses (loss_type="kto"; TRL's
    # KTOConfig defaults). With unbalanced data, the KTO paper keeps λD·nD/(λU·nU) in [1, 4/3].
    desirable_weight: float = setting(1.0, at_least(0))
    undesirable_weight: float = setting(1.0, at_least(0))
    # LoRA trains a small fraction of the weights and tolerates a larger step than full tuning.
    learning_rate: float = setting(5e-5, above(0))
    per_device_batch_size: int = setting(4, above(0))
    gradient_accumulation_steps: int = setting(4, above(0))
    epochs: int = setting(1, above(0))
    # Stop after this many optimizer steps (-1: run all epochs).
    max_steps: int = setting(-1, above(0).also(-1, "all epochs"))
    # Fraction of the optimizer steps spent warming the learning rate up from 0.
    warmup_ratio: float = setting(0.1, between(0, 1))
    weight_decay: float = setting(0.0, at_least(0))
    # Gradients are scaled down to this global norm. `none` turns clipping off (the norm is
    # still logged); 0 is refused, since it would scale every gradient to zero.
    max_grad_norm: float | None = setting(1.0, above(0).also(None, "no clipping"))
    # "auto": paged 8-bit AdamW on CUDA, torch AdamW on the CPU. Or adamw_torch, adamw_8bit,
    # paged_adamw_8bit (CUDA only: on the CPU bitsandbytes silently falls back to non-paged).
    optimizer: str = setting("auto", one_of("auto", "adamw_torch", "adamw_8bit", "paged_adamw_8bit"))
    # Recompute decoder activations in backward: the main activation-memory saving on 24 GB.
    gradient_checkpointing: bool = True
    # Keep the layer inputs that checkpointing saves in (pinned) host memory until backward
    # needs them: GPU activations stop growing with depth, for long contexts. Exact; costs
    # host memory and a copy each way per layer.
    offload_activations: bool = False
    # Response tokens per LM-head chunk: at most [chunk, vocab] logits exist at once (263 MB in
    # fp32 at a 128k vocabulary for 512). Values do not depend on it beyond float rounding, so
    # it is not part of the cache identity; precompute and eval (no gradients) use the default.
    logits_chunk_size: int = setting(512, above(0))
    # How pairs go through the model, in training, precompute and eval: "packed" (several pairs
    # to a row, each prompt + chosen + rejected: the prompt once, no padding), "prompt_shared"
    # (one row per pair, right-padded), "padded" (chosen and rejected in separate rows), or
    # "auto": packed where the model takes it (Llama, Mistral, Qwen2, Gemma 2 with eager, sdpa
    # or flex_attention), padded otherwise; the choice and its reason open the run's log. All
    # equal up to float rounding, so a cache built in one layout serves the others.
    # (Replaces train.prefix_sharing: true reads as prompt_shared, false as padded.)
    layout: str = setting("auto", one_of("auto", "padded", "prompt_shared", "packed"))
    # Fill micro-batches by decoder tokens (padding included; when packed, the prompt once plus
    # both responses) instead of per_device_batch_size pairs: short pairs travel many to a
    # batch, long ones few. A step keeps per_device_batch_size x gradient_accumulation_steps
    # pairs per device, each weighted alike. A pair longer than the budget goes alone. 0: off.
    max_tokens_per_batch: int = setting(0, at_least(0))
    # Log (console + metrics.jsonl) every N optimizer steps.
    logging_steps: int = setting(10, above(0))
    # Also send every metrics.jsonl record to: "tensorboard" (<output_dir>/tensorboard) and/or
    # "wandb"; each is an optional extra. Empty or "none": metrics.jsonl and the console only.
    report_to: list[str] = field(default_factory=list)
    # Checkpoint (adapter, optimizer, scheduler, RNG, data position) every N optimizer steps
    # (0: none). SIGINT/SIGTERM always checkpoint before stopping.
    save_steps: int = setting(100, at_least(0))
    # Keep the newest N checkpoints.
    save_total_limit: int = setting(2, above(0))
    # A step whose loss or gradient is not finite is skipped; this many in a row stop the run.
    max_consecutive_skips: int = setting(5, above(0))
    # Evaluate on the eval split every N optimizer steps (0: only before and after training).
    eval_steps: int = setting(0, at_least(0))
    # Greedy completions of the first generate_prompts distinct held-out prompts, from the
    # policy and from the reference (the base with the adapter disabled), every N optimizer
    # steps and at the end, into samples.jsonl and report.md (0: none; without an eval split
    # there are no held-out prompts, and a run says so once).
    generate_every: int = setting(0, at_least(0))
    generate_prompts: int = setting(4, above(0))
    generate_max_new_tokens: int = setting(128, above(0))
    # A local reward model (an AutoModelForSequenceClassification with one score) that judges
    # the policy's completions of the generate_prompts held-out prompts against the
    # reference's at every evaluation: eval/win_rate (ties count half) and eval/score_gain.
    # Empty: no judge. (Evaluation settings live here, beside eval_steps.)
    reward_model: str = ""
    # Use a reference cache whose identity differs from this run's (logged, not refused), and
    # skip the step-0 agreement check. Only for a deliberate mismatch.
    accept_cache_mismatch: bool = False
    # Seeds Python's and torch's generators; [0, 2**32) is what every common seeding API takes.
    seed: int = setting(42, between(0, 2**32 - 1))


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "lora": LoraConfig,
    "data": DataConfig,
    "precompute": PrecomputeConfig,
    "train": TrainConfig,
}


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    precompute: PrecomputeConfig = field(default_factory=PrecomputeConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> None:
        """Each setting's domain, then what spans several keys."""
        for section_name in SECTIONS:
            section = getattr(self, section_name)
            hints = typing.get_type_hints(type(section))
            for f in dataclasses.fields(section):
                domain = f.metadata.get(DOMAIN)
                value = getattr(section, f.name)
                if domain is not None and not domain.allows(value):
                    raise ConfigError(
                        f"{section_name}.{f.name}={value!r}: must be "
                        f"{domain.describe(is_float=_is_float(hints[f.name]))}"
                    )
        if self.data.max_prompt_length >= self.data.max_length:
            raise ConfigError(
                f"data.max_prompt_length={self.data.max_prompt_length} must be smaller than "
                f"data.max_length={self.data.max_length}: responses need room"
            )
        targets = self.lora.target_modules
        if not targets:
            raise ConfigError("lora.target_modules=[]: name at least one module, or all-linear")
        if "all-linear" in targets and len(targets) > 1:
            raise ConfigError(
                f"lora.target_modules={targets!r}: all-linear already covers every linear layer; "
                "give it alone, or list module names without it"
            )
        if self.train.reward_model and not self.data.eval_path:
            raise ConfigError(
                f"train.reward_model={self.train.reward_model!r} judges completions of held-out prompts: "
                "set data.eval_path"
            )
        if self.train.eval_steps and not self.data.eval_path:
            raise ConfigError(
                f"train.eval_steps={self.train.eval_steps} needs an eval split: set data.eval_path "
                "(or train.eval_steps=0)"
            )
        for name in self.train.report_to:
            if name not in ("none", "tensorboard", "wandb"):
                raise ConfigError(f"train.report_to={name!r}: must be none, tensorboard or wandb")
        self._validate_loss()

    def _validate_loss(self) -> None:
        from lora_dpo.losses import LossSettings

        cfg = self.train
        problem = LossSettings.of(cfg).problem("train.")
        if problem:
            raise ConfigError(problem)


def _closest(name: str, options: typing.Iterable[str]) -> str:
    match = difflib.get_close_matches(name, list(options), n=1)
    return f" (did you mean {match[0]!r}?)" if match else ""


# A float as YAML 1.2 writes it. PyYAML follows YAML 1.1, which wants a dot and a signed
# exponent, so it reads `5e-5` and `1e4` as strings.
_YAML12_FLOAT = re.compile(r"[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?")
_YAML12_SPECIAL = {".inf": math.inf, "+.inf": math.inf, "-.inf": -math.inf, ".nan": math.nan}
# A spelling of "off" for a setting that can be off (`train.max_grad_norm=none`).
_NONE_SPELLINGS = ("none", "null", "~")
_INT64 = 2**63


def _is_float(annotation: Any) -> bool:
    return annotation is float or float in typing.get_args(annotation)


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    """Check `value` against a field's annotation. Ints widen to floats and strings that are
    YAML 1.2 floats become floats; nothing else converts."""
    origin = typing.get_origin(annotation)
    if origin is list:
        (item_type,) = typing.get_args(annotation)
        if isinstance(value, str):  # `lora.target_modules=q_proj,v_proj` on the command line
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        return [_coerce(f"{key}[{i}]", v, item_type) for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(options) != 1 or len(typing.get_args(annotation)) != 2:
            raise NotImplementedError(f"{key}: only `T | None` unions are supported")
        if value is None or (isinstance(value, str) and value.strip().lower() in _NONE_SPELLINGS):
            return None
        return _coerce(key, value, options[0])
    if annotation is float and isinstance(value, str):
        text = value.strip()
        if _YAML12_FLOAT.fullmatch(text):
            return float(text)
        if text.lower() in _YAML12_SPECIAL:
            return _YAML12_SPECIAL[text.lower()]
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        if abs(value) >= 2**1024:  # float() would raise OverflowError
            raise ConfigError(f"{key}: a {len(str(abs(value)))}-digit number is too large for a float")
        return float(value)
    if annotation is str and value is None:
        return ""
    if annotation is bool and not isinstance(value, bool):
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if not isinstance(value, annotation) or (annotation is int and isinstance(value, bool)):
        raise ConfigError(f"{key}: expected {annotation.__name__}, got {type(value).__name__} {value!r}")
    if annotation is int and not -_INT64 <= value < _INT64:  # torch and numpy take int64 at most
        raise ConfigError(
            f"{key}: a {len(str(abs(value)))}-digit number is too large (64-bit integers at most)"
        )
    return value


# Keys that were replaced: (the key now, the value now) for an old value, so old configs keep
# their meaning.
RENAMED_KEYS = {
    "train.prefix_sharing": lambda on: (
        "train.layout",
        "prompt_shared" if _coerce("train.prefix_sharing", on, bool) else "padded",
    ),
}


def _set(config: Config, dotted: str, value: Any, origin: str) -> None:
    if dotted in RENAMED_KEYS:
        dotted, value = RENAMED_KEYS[dotted](value)
    section_name, _, key = dotted.partition(".")
    if section_name not in SECTIONS or not key:
        raise ConfigError(
            f"{origin}: unknown key {dotted!r}{_closest(section_name, SECTIONS)}; "
            f"keys look like section.name, sections: {', '.join(SECTIONS)}"
        )
    section = getattr(config, section_name)
    hints = typing.get_type_hints(type(section))
    if key not in hints:
        raise ConfigError(f"{origin}: unknown key {dotted!r}{_closest(key, hints)}")
    setattr(section, key, _coerce(dotted, value, hints[key]))


def _parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key=value, e.g. train.beta=0.05")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except (yaml.YAMLError, ValueError, RecursionError):  # not YAML: the text itself
        value = raw
    return key.strip(), value


def load_config(path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> Config:
    """Defaults <- YAML file <- `key=value` overrides; then validated."""
    config = Config()
    if path is not None:
        path = Path(path)
        for section_name, values in read_config_file(path).items():
            if values is None:  # a section header with nothing under it
                continue
            if not isinstance(values, dict):
                raise ConfigError(f"{path}: section {section_name!r} must be a mapping")
            for key, value in values.items():
                _set(config, f"{section_name}.{key}", value, str(path))
    for text in overrides:
        key, value = _parse_override(text)
        _set(config, key, value, "override")
    config.validate()
    return config


def with_overrides(config: Config, overrides: typing.Sequence[str], origin: str = "override") -> Config:
    """A validated copy of `config` with `key=value` overrides applied, parsed as on the
    command line (a sweep's grid points)."""
    config = copy.deepcopy(config)
    for text in overrides:
        key, value = _parse_override(text)
        _set(config, key, value, origin)
    config.validate()
    return config


def config_from_dict(raw: dict[str, Any]) -> Config:
    """Rebuild a Config from `Config.to_dict()` output (e.g. a run's saved config.yaml)."""
    config = Config()
    for section_name, values in raw.items():
        for key, value in values.items():
            _set(config, f"{section_name}.{key}", value, "saved config")
    config.validate()
    return config


def dump_config(config: Config) -> str:
    return yaml.safe_dump(config.to_dict(), sort_keys=False)
