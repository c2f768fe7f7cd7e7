"""Typed run configuration: dataclasses with defaults, YAML files, strict `key=value` overrides.

A config file has one mapping per section (`model`, `lora`, `data`, `precompute`, `train`);
overrides on the command line use dotted keys: `train.beta=0.05 data.max_length=2048`.
Unknown keys and wrong types are errors that name the key (and suggest the closest one),
never silently ignored.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lora_dpo.errors import ConfigError


@dataclass
class ModelConfig:
    # Local directory or hub name of a causal LM; the policy's base and, by default, the reference.
    name_or_path: str = ""
    # "nf4": 4-bit NormalFloat with double quantization (QLoRA). "none": plain weights in `dtype`.
    quantization: str = "nf4"
    # Compute dtype: "auto" picks bf16 on CUDA and fp32 on the CPU (bf16 matmuls are slow there).
    dtype: str = "auto"
    # Executing a repository's own Python code is opt-in.
    trust_remote_code: bool = False


@dataclass
class LoraConfig:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    # "all-linear" targets every linear layer except the LM head (QLoRA paper: all layers matter).
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
    # "auto" detects explicit / implicit / conversational from the first row.
    format: str = "auto"
    # Longest prompt + response, in tokens; longer pairs are cut (prompt from the left first).
    max_length: int = 1024
    max_prompt_length: int = 512
    # Keep at most this many pairs (0 = all): for quick trials on a slice.
    max_pairs: int = 0
    # A row that cannot become a pair (bad JSON line, missing field, empty response, ...) is
    # dropped and counted by reason in the data report, so one bad line among millions does
    # not stop a run; true makes the first such row an error naming its file, line and field.
    strict: bool = False


@dataclass
class PrecomputeConfig:
    # Where the reference cache (manifest.json + shard-*.safetensors) lives.
    cache_dir: str = "runs/ref-cache"
    # Pairs per reference forward (no gradients: larger than the training batch is fine).
    batch_size: int = 8
    # Pairs per safetensors shard: a shard is the unit of resume after an interruption.
    shard_size: int = 4096
    # "policy": the same quantized base the policy starts from (step-0 loss is exactly ln 2).
    # "bf16" / "fp32": an unquantized reference, an explicit choice recorded in the manifest.
    reference: str = "policy"


@dataclass
class TrainConfig:
    output_dir: str = "runs/train"
    # A finished run (output_dir/adapter) is never replaced unless this is set.
    overwrite_output_dir: bool = False
    beta: float = 0.1
    # TRL's names, so settings carry over: "sigmoid" (DPO), "ipo" (length-normalised, targets a
    # margin of 1/(2β) instead of an unbounded one), "hinge" (SLiC), "robust" (rDPO), and the
    # rest of TRL's DPO list (lora_dpo.losses.LOSS_TYPES). Several DPO loss types at once (TRL's
    # list loss_type=[a, b]) are joined with "+": "sigmoid+bco_pair+sft" (MPO). The
    # reference-free "simpo", "orpo" and "cpo" stand alone and need no reference cache.
    loss_type: str = "sigmoid"
    # Probability that a preference label is flipped: cDPO on "sigmoid", rDPO's ε on "robust",
    # EXO's ε on "exo_pair" (which needs it > 0). 0 trusts every label. Must be < 0.5 (at 0.5
    # the labels carry no information).
    label_smoothing: float = 0.0
    # Weight of the RPO term, the NLL of the chosen response (TRL's rpo_alpha; the RPO paper
    # uses 1.0). 0 turns it off: plain preference optimisation can lower chosen likelihoods too.
    rpo_alpha: float = 0.0
    # One weight per loss type joined in loss_type (TRL's loss_weights; MPO: [0.8, 0.2, 1.0]).
    # Empty: every loss type weighs 1.
    loss_weights: list[float] = field(default_factory=list)
    # LD-DPO's α in [0, 1]: response tokens past the pair's shared length min(|yw|, |yl|) count
    # with this weight, so verbosity earns less reward. 1.0 is plain DPO (TRL's ld_alpha=None).
    ld_alpha: float = 1.0
    # WPO: weight each pair by how likely the policy is to generate it (TRL's use_weighting), so
    # off-policy pairs count less.
    use_weighting: bool = False
    # f-DPO's regulariser: "reverse_kl" (DPO's), "forward_kl", "js_divergence" or
    # "alpha_divergence" with f_alpha_divergence_coef (1 is reverse KL, 0 forward KL).
    f_divergence_type: str = "reverse_kl"
    f_alpha_divergence_coef: float = 0.5
    # DiscoPOP's temperature τ, the paper's value (loss_type="discopop").
    discopop_tau: float = 0.05
    # SimPO's target reward margin γ (loss_type="simpo"; TRL's simpo_gamma).
    simpo_gamma: float = 0.5
    # Weight of CPO's chosen NLL term (loss_type="cpo"; TRL's CPOConfig default).
    cpo_alpha: float = 1.0
    # LoRA trains a small fraction of the weights and tolerates a larger step than full tuning.
    learning_rate: float = 5e-5
    per_device_batch_size: int = 4
    gradient_accumulation_steps: int = 4
    epochs: int = 1
    # Stop after this many optimizer steps (-1: run all epochs).
    max_steps: int = -1
    warmup_ratio: float = 0.1
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    # "auto": paged 8-bit AdamW on CUDA, torch AdamW on the CPU. Or adamw_torch, adamw_8bit,
    # paged_adamw_8bit (CUDA only: on the CPU bitsandbytes silently falls back to non-paged).
    optimizer: str = "auto"
    # Recompute decoder activations in backward: the main activation-memory saving on 24 GB.
    gradient_checkpointing: bool = True
    # Response tokens per LM-head chunk: at most [chunk, vocab] logits exist at once (263 MB in
    # fp32 at a 128k vocabulary for 512). Values do not depend on it beyond float rounding, so
    # it is not part of the cache identity; precompute and eval (no gradients) use the default.
    logits_chunk_size: int = 512
    # Prefix sharing: forward each pair as one row, prompt + chosen + rejected, so the prompt
    # runs once (a block mask keeps rejected from seeing chosen). Equal to the unshared values
    # up to float rounding; pays off when prompts are long next to responses. Llama, Mistral,
    # Qwen2 and Gemma 2 with eager or sdpa attention.
    prefix_sharing: bool = False
    # Log (console + metrics.jsonl) every N optimizer steps.
    logging_steps: int = 10
    # Also send every metrics.jsonl record to: "tensorboard" (<output_dir>/tensorboard) and/or
    # "wandb"; each is an optional extra. Empty or "none": metrics.jsonl and the console only.
    report_to: list[str] = field(default_factory=list)
    # Checkpoint (adapter, optimizer, scheduler, RNG, data position) every N optimizer steps
    # (0: none). SIGINT/SIGTERM always checkpoint before stopping.
    save_steps: int = 100
    # Keep the newest N checkpoints.
    save_total_limit: int = 2
    # A step whose loss or gradient is not finite is skipped; this many in a row stop the run.
    max_consecutive_skips: int = 5
    # Evaluate on the eval split every N optimizer steps (0: only before and after training).
    eval_steps: int = 0
    # Use a reference cache whose identity differs from this run's (logged, not refused), and
    # skip the step-0 agreement check. Only for a deliberate mismatch.
    accept_cache_mismatch: bool = False
    seed: int = 42


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
        """Check values the type system cannot: choices and ranges."""
        choices = {
            "model.quantization": (self.model.quantization, ("nf4", "none")),
            "model.dtype": (self.model.dtype, ("auto", "fp32", "bf16", "fp16")),
            "data.format": (self.data.format, ("auto", "explicit", "implicit", "conversational")),
            "precompute.reference": (self.precompute.reference, ("policy", "bf16", "fp32")),
            "train.optimizer": (
                self.train.optimizer,
                ("auto", "adamw_torch", "adamw_8bit", "paged_adamw_8bit"),
            ),
        }
        for key, (value, allowed) in choices.items():
            if value not in allowed:
                raise ConfigError(f"{key}={value!r}: must be one of {', '.join(allowed)}")
        positive = {
            "lora.r": self.lora.r,
            "data.max_length": self.data.max_length,
            "data.max_prompt_length": self.data.max_prompt_length,
            "precompute.batch_size": self.precompute.batch_size,
            "precompute.shard_size": self.precompute.shard_size,
            "train.per_device_batch_size": self.train.per_device_batch_size,
            "train.gradient_accumulation_steps": self.train.gradient_accumulation_steps,
            "train.epochs": self.train.epochs,
            "train.logging_steps": self.train.logging_steps,
            "train.save_total_limit": self.train.save_total_limit,
            "train.max_consecutive_skips": self.train.max_consecutive_skips,
            "train.beta": self.train.beta,
            "train.learning_rate": self.train.learning_rate,
            "train.logits_chunk_size": self.train.logits_chunk_size,
        }
        for key, value in positive.items():
            if not value > 0:
                raise ConfigError(f"{key}={value}: must be > 0")
        if self.data.max_prompt_length >= self.data.max_length:
            raise ConfigError(
                f"data.max_prompt_length={self.data.max_prompt_length} must be smaller than "
                f"data.max_length={self.data.max_length}: responses need room"
            )
        if not 0.0 <= self.lora.dropout < 1.0:
            raise ConfigError(f"lora.dropout={self.lora.dropout}: must be in [0, 1)")
        if not 0.0 <= self.train.warmup_ratio <= 1.0:
            raise ConfigError(f"train.warmup_ratio={self.train.warmup_ratio}: must be in [0, 1]")
        if self.train.max_steps == 0 or self.train.max_steps < -1:
            raise ConfigError(f"train.max_steps={self.train.max_steps}: must be -1 (all epochs) or > 0")
        for key, value in (("data.max_pairs", self.data.max_pairs), ("train.eval_steps", self.train.eval_steps)):
            if value < 0:
                raise ConfigError(f"{key}={value}: must be >= 0")
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
        from lora_dpo.losses.settings import F_DIVERGENCE_TYPES

        cfg = self.train
        if not 0.0 <= cfg.label_smoothing < 0.5:
            raise ConfigError(f"train.label_smoothing={cfg.label_smoothing}: must be in [0, 0.5)")
        for key, value in (("rpo_alpha", cfg.rpo_alpha), ("cpo_alpha", cfg.cpo_alpha)):
            if value < 0:
                raise ConfigError(f"train.{key}={value}: must be >= 0")
        if not 0.0 <= cfg.ld_alpha <= 1.0:
            raise ConfigError(f"train.ld_alpha={cfg.ld_alpha}: must be in [0, 1]")
        if not cfg.discopop_tau > 0:
            raise ConfigError(f"train.discopop_tau={cfg.discopop_tau}: must be > 0")
        if cfg.f_divergence_type not in F_DIVERGENCE_TYPES:
            raise ConfigError(
                f"train.f_divergence_type={cfg.f_divergence_type!r}: must be one of {', '.join(F_DIVERGENCE_TYPES)}"
            )
        problem = LossSettings.of(cfg).problem("train.")
        if problem:
            raise ConfigError(problem)
        if cfg.ld_alpha != 1.0:
            raise ConfigError(
                f"train.ld_alpha={cfg.ld_alpha} needs a reference cache with the log-probs of each "
                "response's shared prefix (min(|yw|, |yl|) tokens); not available yet"
            )


def _closest(name: str, options: typing.Iterable[str]) -> str:
    match = difflib.get_close_matches(name, list(options), n=1)
    return f" (did you mean {match[0]!r}?)" if match else ""


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    """Check `value` against a field's annotation; ints widen to floats, nothing else converts."""
    origin = typing.get_origin(annotation)
    if origin in (list, typing.List):
        (item_type,) = typing.get_args(annotation)
        if isinstance(value, str):  # `lora.target_modules=q_proj,v_proj` on the command line
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        return [_coerce(f"{key}[{i}]", v, item_type) for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        raise NotImplementedError(f"{key}: union-typed config fields are not supported")
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation is str and value is None:
        return ""
    if annotation is bool and not isinstance(value, bool):
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if not isinstance(value, annotation) or (annotation is int and isinstance(value, bool)):
        raise ConfigError(
            f"{key}: expected {annotation.__name__}, got {type(value).__name__} {value!r}"
        )
    return value


def _set(config: Config, dotted: str, value: Any, origin: str) -> None:
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
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def load_config(path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> Config:
    """Defaults <- YAML file <- `key=value` overrides; then validated."""
    config = Config()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a mapping of sections, got {type(raw).__name__}")
        for section_name, values in raw.items():
            if not isinstance(values, dict):
                raise ConfigError(f"{path}: section {section_name!r} must be a mapping")
            for key, value in values.items():
                _set(config, f"{section_name}.{key}", value, str(path))
    for text in overrides:
        key, value = _parse_override(text)
        _set(config, key, value, "override")
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
