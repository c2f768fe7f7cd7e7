"""Which LoRA adapter a command was given, and whether it fits the base it is about to meet.

`eval` and `merge` both take a train run directory (`RUN`, read as `RUN/adapter`), `RUN/adapter`
itself, or any PEFT LoRA adapter directory. `read_adapter` resolves the path and checks the
files (adapter_config.json is a JSON object naming a LoRA adapter; adapter_model.safetensors
is whole and holds LoRA tensors) before any model is loaded, so a wrong path or a damaged
adapter is one line, not a traceback a minute into a model load.

An adapter records the base it was trained on (`base_model_name_or_path`). `check_base`
refuses one recorded for another base unless the base was named explicitly (`--base`), and
`check_fits` always compares every LoRA A/B tensor with the module it adapts, and the saved
tokenizer with the base's vocabulary: from the base's safetensors headers before the load
(`shapes_from_files`, when the base is a local checkpoint) and from the loaded modules before
peft touches them (`shapes_of`, which `model.load_adapter` runs).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from lora_dpo.errors import ConfigError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # how peft names the wrapped model's modules in its files
# suffix of a LoRA tensor in adapter_model.safetensors -> (which factor, of an embedding)
LORA_SUFFIXES = {
    ".lora_A.weight": ("a", False),
    ".lora_B.weight": ("b", False),
    ".lora_embedding_A": ("a", True),
    ".lora_embedding_B": ("b", True),
}


@dataclass(frozen=True)
class LoraFactors:
    """The shapes of one adapted module's factors: A [r, in] and B [out, r]; for an embedding
    A [r, num_embeddings] and B [embedding_dim, r]."""

    a: list[int]
    b: list[int]
    embedding: bool = False


@dataclass(frozen=True)
class Adapter:
    """A checked PEFT LoRA adapter directory."""

    directory: Path
    config: dict[str, Any]  # adapter_config.json
    factors: dict[str, LoraFactors]  # by the adapted module's name in the base

    @property
    def recorded_base(self) -> str:
        return str(self.config.get("base_model_name_or_path") or "")

    @property
    def embedding_modules(self) -> set[str]:
        return {name for name, f in self.factors.items() if f.embedding}

    @cached_property
    def tokenizer_size(self) -> int | None:
        """len() of the tokenizer saved beside the adapter (a train run saves one), else None."""
        if not any((self.directory / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
            return None
        from transformers import AutoTokenizer

        try:
            return len(AutoTokenizer.from_pretrained(str(self.directory)))
        except (OSError, ValueError, TypeError, KeyError) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ConfigError(
                f"{self.directory}: the tokenizer saved there cannot be read: {first[:200]}"
            ) from None


def find_adapter_dir(path: str | Path, label: str | None = None) -> Path:
    """`path` itself when it holds adapter_config.json, else `path/adapter` (a train run).
    `label` is how errors name where the path came from (default `--adapter PATH`)."""
    path = Path(path)
    label = label or f"--adapter {path}"
    if not path.exists():
        raise ConfigError(f"{label}: no such directory (no {ADAPTER_CONFIG} there or in {path / 'adapter'})")
    if not path.is_dir():
        raise ConfigError(
            f"{label}: a file, not an adapter directory (give the directory that holds {ADAPTER_CONFIG})"
        )
    for candidate in (path, path / "adapter"):
        if (candidate / ADAPTER_CONFIG).exists():
            return candidate
    if (path / "config.yaml").is_file():
        raise ConfigError(
            f"{label}: a train run directory with no {ADAPTER_CONFIG} in {path / 'adapter'} "
            "(training has not finished?)"
        )
    raise ConfigError(f"{label}: no {ADAPTER_CONFIG} there or in {path / 'adapter'}")


def read_adapter(path: str | Path, label: str | None = None) -> Adapter:
    """Resolve `path` (see `find_adapter_dir`) and check its files; reads headers only."""
    directory = find_adapter_dir(path, label)
    config = _read_adapter_config(directory / ADAPTER_CONFIG)
    return Adapter(directory, config, _read_factors(directory / ADAPTER_WEIGHTS))


def _read_adapter_config(path: Path) -> dict[str, Any]:
    try:
        config = json.loads(path.read_bytes().decode("utf-8"))
    except OSError as exc:
        raise ConfigError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text; the file is damaged") from None
    except json.JSONDecodeError as exc:
        where = f"line {exc.lineno} column {exc.colno}"
        raise ConfigError(f"{path}: not valid JSON ({exc.msg} at {where}); the file is damaged") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: expected a JSON object, got {type(config).__name__}")
    if config.get("peft_type") != "LORA":
        raise ConfigError(f"{path}: peft_type={config.get('peft_type')!r}; only LoRA adapters are supported")
    return config


def _read_factors(path: Path) -> dict[str, LoraFactors]:
    """Shapes of the LoRA tensors, by adapted module; the whole file's extent is checked."""
    if not path.is_file():
        bin_only = (path.parent / "adapter_model.bin").is_file()
        beside = " (an adapter_model.bin is not read: save the adapter with safetensors)" if bin_only else ""
        raise ConfigError(f"{path.parent}: no {ADAPTER_WEIGHTS}{beside}")
    found: dict[str, dict[str, Any]] = {}
    for key, shape in tensor_shapes(path).items():
        for suffix, (factor, embedding) in LORA_SUFFIXES.items():
            if key.endswith(suffix):
                module = key.removesuffix(suffix).removeprefix(PEFT_PREFIX)
                found.setdefault(module, {"embedding": embedding})[factor] = shape
    if not found:
        raise ConfigError(f"{path}: holds no LoRA tensors (lora_A / lora_B)")
    factors = {}
    for module, entry in found.items():
        if "a" not in entry or "b" not in entry:
            missing = "lora_B" if "a" in entry else "lora_A"
            raise ConfigError(f"{path}: {module} has no {missing} tensor; the file is damaged")
        a, b = entry["a"], entry["b"]
        if len(a) != 2 or len(b) != 2 or a[0] != b[1]:
            raise ConfigError(f"{path}: {module} lora_A is {a} and lora_B is {b}: their ranks do not agree")
        factors[module] = LoraFactors(a, b, entry["embedding"])
    return factors


def tensor_shapes(path: Path) -> dict[str, list[int]]:
    """Every tensor's shape from a safetensors header; a truncated or damaged file is one line."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            return {key: list(handle.get_slice(key).get_shape()) for key in handle.keys()}
    except OSError as exc:
        raise ConfigError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    except SafetensorError as exc:
        detail = str(exc).removeprefix("Error while deserializing header: ")
        raise ConfigError(
            f"{path}: not a complete safetensors file ({detail}); the file is truncated or damaged"
        ) from None


# ----------------------------------------------------------------------------- adapter vs base


def check_base(adapter: Adapter, base: str, *, explicit: bool) -> None:
    """An adapter recorded for another base is refused unless `base` was given explicitly
    (`--base`); its shapes are checked either way (`check_fits`)."""
    recorded = adapter.recorded_base
    if explicit or not recorded or same_model(recorded, base):
        return
    raise ConfigError(
        f"{adapter.directory}: trained on {recorded!r} ({ADAPTER_CONFIG} base_model_name_or_path), "
        f"this run's base is {base!r}; pass --base {base} to use it anyway (shapes are checked)"
    )


def same_model(a: str, b: str) -> bool:
    """The same name, or two paths to the same local directory."""
    if a == b:
        return True
    first, second = Path(a).expanduser(), Path(b).expanduser()
    try:
        return first.is_dir() and second.is_dir() and os.path.samefile(first, second)
    except OSError:
        return False


@dataclass(frozen=True)
class BaseShapes:
    """The base's 2-D weights as stored (Linear [out, in], Conv1D [in, out], Embedding
    [num, dim]), by module name, and its vocabulary size."""

    weights: dict[str, list[int]]
    vocab: int | None
    complete: bool  # every module of the base is listed (a loaded model), not only found ones


def shapes_from_files(model_dir: Path | None) -> BaseShapes | None:
    """From the config.json and safetensors headers of a local base, without loading it; None
    when that is not possible cheaply (no local directory, .bin weights, pre-quantized weights
    whose stored shapes are packed)."""
    if model_dir is None or not model_dir.is_dir():
        return None
    try:
        config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # the model load reports it
    if not isinstance(config, dict) or "quantization_config" in config:
        return None
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        return None
    weights: dict[str, list[int]] = {}
    for path in files:
        for key, shape in tensor_shapes(path).items():
            if key.endswith(".weight") and len(shape) == 2:
                weights[key.removesuffix(".weight")] = shape
    text_config = config.get("text_config")  # multimodal configs nest the language model's
    vocab = config.get("vocab_size") or (
        text_config.get("vocab_size") if isinstance(text_config, dict) else None
    )
    return BaseShapes(weights, int(vocab) if isinstance(vocab, int) else None, complete=False)


def check_against_files(adapter: Adapter, model_dir: Path | None, base_name: str) -> None:
    """`check_fits` before any load, where the base's files allow it (see `shapes_from_files`);
    `model.load_adapter` checks again on the loaded modules."""
    shapes = shapes_from_files(model_dir)
    if shapes is not None:
        check_fits(adapter, shapes, base_name)


def shapes_of(model: torch.nn.Module) -> BaseShapes:
    """From a loaded base (before peft wraps it); a 4-bit layer reports its unpacked shape."""
    weights = {}
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor):
            continue
        quant_state = getattr(weight, "quant_state", None)  # bitsandbytes 4-bit: packed storage
        shape = list(quant_state.shape) if quant_state is not None else list(weight.shape)
        if len(shape) == 2:
            weights[name] = shape
    input_embeddings = getattr(model, "get_input_embeddings", None)
    embeddings = input_embeddings() if callable(input_embeddings) else None
    vocab = int(embeddings.weight.shape[0]) if embeddings is not None else None
    return BaseShapes(weights, vocab, complete=True)


def check_fits(adapter: Adapter, base: BaseShapes, base_name: str) -> None:
    """Every LoRA factor against the weight it adapts, then the saved tokenizer against the
    base's vocabulary; the first mismatch is the error."""
    transposed = bool(adapter.config.get("fan_in_fan_out"))  # Conv1D bases store [in, out]
    for module, factors in adapter.factors.items():
        weight = base.weights.get(module)
        if weight is None:
            if base.complete:
                raise ConfigError(
                    f"{adapter.directory}: adapts {module}, which the base {base_name!r} does not have"
                )
            continue  # stored under another name in the checkpoint: the loaded model will tell
        in_dim, out_dim = (0, 1) if transposed or factors.embedding else (1, 0)
        short = module.rpartition(".")[2]
        a, b = factors.a, factors.b
        if a[1] != weight[in_dim]:
            raise ConfigError(
                f"{adapter.directory}: does not fit the base {base_name!r}: lora_A of {module} is {a}, "
                f"the base's {short} takes {weight[in_dim]} inputs"
            )
        if b[0] != weight[out_dim]:
            raise ConfigError(
                f"{adapter.directory}: does not fit the base {base_name!r}: lora_B of {module} is {b}, "
                f"the base's {short} gives {weight[out_dim]} outputs"
            )
    size = adapter.tokenizer_size
    if size is not None and base.vocab is not None and size > base.vocab:
        raise ConfigError(
            f"{adapter.directory}: does not fit the base {base_name!r}: the tokenizer saved with the "
            f"adapter has {size} tokens, the base's embedding has {base.vocab} rows"
        )


# ----------------------------------------------------------------------------- merge's limits


def check_mergeable(adapter: Adapter) -> None:
    """What `merge` folds is B·A·scaling into a linear weight; adapters that need more are
    refused before any load. (`eval` runs them through peft's own forward, which has them.)"""
    check_plain_lora(adapter, "be merged here")


def check_plain_lora(adapter: Adapter, use: str) -> None:
    """Plain LoRA on linear layers, nothing more: what `merge` folds and what DPO may start
    from (its result must merge); `use` says what the adapter cannot do otherwise."""
    config, where = adapter.config, adapter.directory / ADAPTER_CONFIG
    if config.get("use_dora"):
        raise ConfigError(f"{where}: a DoRA adapter (use_dora) cannot {use}; plain LoRA only")
    if config.get("lora_bias"):
        raise ConfigError(f"{where}: adapters with lora_bias cannot {use}")
    if config.get("fan_in_fan_out"):
        raise ConfigError(f"{where}: fan_in_fan_out adapters (Conv1D bases) cannot {use}")
    if config.get("modules_to_save"):
        raise ConfigError(f"{where}: adapters with modules_to_save {config['modules_to_save']} cannot {use}")
    if adapter.embedding_modules:
        raise ConfigError(
            f"{where}: adapts embedding layers ({', '.join(sorted(adapter.embedding_modules))}); only linear layers can {use}"
        )


def check_mergeable_layer(name: str, module: torch.nn.Module) -> None:
    """The variants adapter_config.json names in ways not listed above, on the LoRA layer peft
    built from it (peft marks every variant in `lora_variant`)."""
    variants = getattr(module, "lora_variant", None)  # adapter name -> variant (DoRA, ...)
    if variants:  # they rescale or reshape the weight: B·A·scaling is not the whole update
        raise ConfigError(f"{name}: LoRA variant {list(variants)} cannot be merged here; plain LoRA only")
