"""Load the base model (nf4 / bf16 / fp32) and its tokenizer; attach or load a LoRA adapter."""

from __future__ import annotations

import logging
import os
import pickle
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, PreTrainedModel

from lora_dpo.adapter_start import (
    load_start,
    read_start_adapter,
    read_start_record,
    remember_start,
    stack_frozen,
    stacked_under,
    start_of,
)
from lora_dpo.adapters import Adapter, check_against_files, check_base, check_fits, read_adapter, shapes_of
from lora_dpo.config import Config, LoraConfig, ModelConfig
from lora_dpo.dropout import use_dropout16
from lora_dpo.errors import ConfigError

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def default_device() -> torch.device:
    """This process's GPU (torchrun's LOCAL_RANK picks one per process), else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


@dataclass(frozen=True)
class DtypeChoice:
    dtype: torch.dtype
    reason: str  # why, for the log


def choose_dtype(name: str, device_type: str, bf16_supported: bool) -> DtypeChoice:
    """The compute dtype `model.dtype` names on a device of `device_type` ("cuda", "cpu"), where
    `bf16_supported` says whether that device has bf16 in hardware. "auto": bf16 on a GPU that
    has it; fp16 on one that does not (emulated bf16 is many times slower), which training
    runs with loss scaling; fp32 on the CPU (bf16 and fp16 matmuls are slow there)."""
    if name != "auto":
        return DtypeChoice(DTYPES[name], f"model.dtype={name}")
    if device_type != "cuda":
        return DtypeChoice(
            torch.float32, "model.dtype=auto off CUDA: fp32, bf16 and fp16 matmuls are slow there"
        )
    if bf16_supported:
        return DtypeChoice(torch.bfloat16, "model.dtype=auto: this GPU computes in bf16 natively")
    return DtypeChoice(
        torch.float16, "model.dtype=auto: this GPU has no native bf16; fp16, with loss scaling in training"
    )


def native_bf16(device: torch.device) -> bool:
    """Whether `device` computes in bf16 in hardware (not emulated through fp32)."""
    if device.type != "cuda":
        return False
    with torch.cuda.device(device):
        return torch.cuda.is_bf16_supported(including_emulation=False)


def dtype_choice(name: str, device: torch.device) -> DtypeChoice:
    return choose_dtype(name, device.type, native_bf16(device))


def compute_dtype(name: str, device: torch.device) -> torch.dtype:
    return dtype_choice(name, device).dtype


def load_tokenizer(cfg: ModelConfig):
    path = _require_model_path(cfg)
    _check_hub_access(path)
    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as exc:  # not found, no network, custom code not trusted
        raise ConfigError(_load_failure(path, "its tokenizer", exc)) from None


@dataclass(frozen=True)
class Precision:
    """How a model runs: 4-bit or plain weights, and its compute dtype."""

    quantization: str  # "nf4" | "none"
    dtype: torch.dtype  # compute dtype

    def to_dict(self) -> dict[str, str]:
        return {"quantization": self.quantization, "dtype": str(self.dtype).removeprefix("torch.")}


def load_base_at(cfg: ModelConfig, precision: Precision, device: torch.device) -> PreTrainedModel:
    """The frozen base at `precision`: what precompute, train, eval and generate all load."""
    return load_base_model(
        cfg, quantize=precision.quantization == "nf4", dtype=precision.dtype, device=device
    )


def load_base_model(
    cfg: ModelConfig, *, quantize: bool, dtype: torch.dtype, device: torch.device
) -> PreTrainedModel:
    """The frozen base, 4-bit nf4 (double quantization) when `quantize`, else plain `dtype`."""
    path = _require_model_path(cfg)
    quantization = None
    if quantize:
        quantization = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
    _check_hub_access(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path,
            quantization_config=quantization,
            dtype=dtype,
            device_map={"": str(device)},
            trust_remote_code=cfg.trust_remote_code,
        )
    except (
        OSError,
        ValueError,
        pickle.UnpicklingError,
    ) as exc:  # not found, no network, untrusted code or pickle
        raise ConfigError(_load_failure(path, "the model", exc)) from None
    disable_cpu_weight_repack(model)
    model.requires_grad_(False)
    return model


def disable_cpu_weight_repack(model: torch.nn.Module) -> int:
    """Stop bitsandbytes from repacking 4-bit weights for its CPU inference kernel.

    On a CPU with AVX512-BF16, `Linear4bit.forward` repacks its weight for good the first
    time it runs in eval mode on an input without grad (a precompute or eval forward). Later
    training forwards then go through `gemv_4bit`, which has no autograd kernel: the gradient
    through the base layers is silently dropped and LoRA gradients come out wrong. Turning the
    flag off keeps every forward on the same dequantize-and-matmul path, so reference values
    and policy values are also computed identically. Returns the number of layers guarded.
    """
    import bitsandbytes as bnb

    guarded = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            if getattr(module.weight.quant_state, "packing_format_for_cpu", False):
                raise RuntimeError(
                    f"{type(module).__name__} weight was already repacked for CPU inference; "
                    "load the model again before training"
                )
            module.support_avx512bf16_for_cpu = False
            guarded += 1
    return guarded


def check_target_modules(model: torch.nn.Module, targets: list[str]) -> None:
    """Each `lora.target_modules` name must match a module LoRA can wrap the way peft matches
    a list (the full name, or its last dotted parts), with the closest linear layer names as
    a hint: peft's own error is a traceback, after minutes of model loading."""
    import difflib

    from transformers.pytorch_utils import Conv1D

    if targets == ["all-linear"]:
        return
    linear = (torch.nn.Linear, Conv1D)  # bitsandbytes' 4-bit and 8-bit layers are nn.Linear
    wrappable = linear + (torch.nn.Embedding, torch.nn.Conv1d, torch.nn.Conv2d)
    names = [name for name, module in model.named_modules() if isinstance(module, wrappable)]
    for target in targets:
        if any(name == target or name.endswith(f".{target}") for name in names):
            continue
        layers = [name for name, module in model.named_modules() if name and isinstance(module, linear)]
        depth = target.count(".") + 1  # `mlp.gate` is compared with `mlp.gate_proj`, not `gate_proj`
        tails = {".".join(name.split(".")[-depth:]) for name in layers}
        close = difflib.get_close_matches(target, sorted(tails), n=3)
        leaves = ", ".join(sorted({name.rsplit(".", 1)[-1] for name in layers}))
        hint = f"closest: {', '.join(close)}" if close else f"its linear layers: {leaves}"
        raise ConfigError(f"lora.target_modules: {target!r} matches no module of the model; {hint}")


def attach_lora(model: PreTrainedModel, cfg: LoraConfig, *, gradient_checkpointing: bool):
    """Wrap the frozen base with trainable LoRA adapters (fp32 weights, whatever the compute dtype).

    Unlike peft's `prepare_model_for_kbit_training`, the non-quantized base weights
    (embeddings, norms, LM head) are not upcast to fp32: they are frozen, and on a 128k
    vocabulary that copy alone would cost gigabytes.
    """
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    check_target_modules(model, cfg.target_modules)
    if gradient_checkpointing:
        enable_checkpointing(model)
    targets = cfg.target_modules
    peft_config = PeftLoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules="all-linear" if targets == ["all-linear"] else targets,
        bias="none",
        task_type="CAUSAL_LM",
    )
    # autocast_adapter_dtype (default True) keeps LoRA weights in fp32: their updates are tiny
    # next to their values, and bf16 would round many of them away.
    with warnings.catch_warnings():  # peft asks for the old checkpointing attribute name
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
        policy = get_peft_model(model, peft_config, autocast_adapter_dtype=True)
    _check_trainable_fp32(policy)
    return policy


def enable_checkpointing(model: PreTrainedModel) -> None:
    # Non-reentrant checkpointing needs no input that requires grad and handles frozen bases.
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.config.use_cache = False


def _check_trainable_fp32(policy: torch.nn.Module) -> None:
    for name, param in policy.named_parameters():
        if param.requires_grad and param.dtype != torch.float32:
            raise AssertionError(f"trainable parameter {name} is {param.dtype}, expected fp32")


def build_policy(model: PreTrainedModel, config: Config, *, gradient_checkpointing: bool):
    """The policy DPO trains on the frozen base `model`: fresh `lora.*` adapters, or, with
    `model.adapter_path`, that adapter continued or a fresh one stacked on it frozen
    (lora_dpo.adapter_start)."""
    adapter = read_start_adapter(config.model)
    if adapter is None or config.model.adapter_mode == "stack":
        policy = attach_lora(model, config.lora, gradient_checkpointing=gradient_checkpointing)
        if adapter is not None:
            stack_frozen(policy, adapter)
    else:
        if gradient_checkpointing:
            enable_checkpointing(model)
        policy = load_start(model, adapter, trainable=True)
        policy.peft_config["default"].base_model_name_or_path = config.model.name_or_path
        log.info("continuing the adapter %s (lora.* settings are its own)", adapter.directory)
    _check_trainable_fp32(policy)
    use_dropout16(policy)  # the same dropout, its mask drawn 4x cheaper on the CPU
    if adapter is not None:
        remember_start(policy, start_of(config.model, adapter))
    return policy


def load_reference_at(cfg: ModelConfig, precision: Precision, device: torch.device) -> torch.nn.Module:
    """The reference precompute scores: the frozen base at `precision`, with the start adapter
    (`model.adapter_path`) when there is one, as the step-0 policy runs it."""
    adapter = read_start_adapter(cfg)  # before the load: a bad adapter costs no model load
    model = load_base_at(cfg, precision, device)
    return model if adapter is None else load_start(model, adapter, trainable=False)


def check_adapter_base(adapter: Adapter, cfg: ModelConfig, *, explicit_base: bool) -> None:
    """Before any model is loaded: the adapter's recorded base is the base `cfg` names (unless
    that base was given explicitly), and its shapes fit the base's safetensors headers."""
    check_base(adapter, cfg.name_or_path, explicit=explicit_base)
    check_against_files(adapter, resolve_model_dir(cfg), cfg.name_or_path)


def load_adapter(model: PreTrainedModel, adapter: str | Path | Adapter, *, trainable: bool = False):
    """`model` wrapped with the LoRA adapter at `adapter` (a directory, checked by
    `adapters.read_adapter`, or an `Adapter` already read). Every LoRA factor is checked
    against the loaded module it adapts first, so a foreign adapter is one line, not peft's
    size-mismatch dump."""
    from peft import PeftModel

    if not isinstance(adapter, Adapter):
        adapter = read_adapter(adapter)
    start = read_start_record(adapter.directory)  # how a run's export started, if it is one
    stacked = stacked_under(adapter, start)  # an export that trained on a frozen SFT adapter
    check_fits(adapter, shapes_of(model), model.name_or_path)
    try:
        peft_model = PeftModel.from_pretrained(model, str(adapter.directory), is_trainable=trainable)
    except (ValueError, RuntimeError, KeyError) as exc:  # what the checks above cannot foresee
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ConfigError(
            f"{adapter.directory}: peft cannot load it onto {model.name_or_path!r}: {first[:300]}"
        ) from None
    if stacked is not None:
        stack_frozen(peft_model, stacked)
    if start is not None:  # the reference generate compares with is base + the start adapter
        remember_start(peft_model, start)
    return peft_model


def resolve_model_dir(cfg: ModelConfig) -> Path | None:
    """The local directory holding the model's files: the path itself, or the hub cache's
    snapshot of a hub name (None when it has not been downloaded)."""
    path = Path(_require_model_path(cfg)).expanduser()
    if path.is_dir():
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(cfg.name_or_path, local_files_only=True))
    except Exception:  # not a hub name, or not in the local hub cache
        return None


def _require_model_path(cfg: ModelConfig) -> str:
    from lora_dpo.hub import looks_like_hub_name

    path = cfg.name_or_path
    if not path:
        raise ConfigError("model.name_or_path is not set: give a local model directory or hub name")
    local = Path(path).expanduser()
    if local.is_dir():
        return path
    if local.exists():
        raise ConfigError(f"model.name_or_path={path!r}: a file, not a model directory")
    if not looks_like_hub_name(path):
        raise ConfigError(f"model.name_or_path={path!r}: no such directory")
    return path


def _check_hub_access(path: str) -> None:
    """A hub name with no network fails in seconds, not after half a minute of retries."""
    if not Path(path).expanduser().is_dir():
        from lora_dpo.hub import go_offline_if_unreachable

        go_offline_if_unreachable()


def _load_failure(path: str, what: str, exc: BaseException) -> str:
    """One line: transformers' messages run over several lines and carry advice for its own API."""
    from lora_dpo.hub import offline_mode, offline_reason

    text = str(exc).strip()
    if isinstance(exc, pickle.UnpicklingError):
        return (
            f"model.name_or_path={path!r}: a weight file holds pickled objects beyond plain "
            "tensors, refused unread (torch.load weights_only=True); use safetensors weights"
        )
    if "trust_remote_code" in text:
        return (
            f"model.name_or_path={path!r}: the repository ships its own Python code, which "
            "runs only with model.trust_remote_code=true (set it only if you trust that code)"
        )
    if not Path(path).expanduser().is_dir() and offline_mode():
        return (
            f"model.name_or_path={path!r}: not a local directory and not in the local Hugging "
            f"Face cache, and {offline_reason()}; download it where there is network, or give "
            "a local directory"
        )
    first = text.splitlines()[0] if text else type(exc).__name__
    return f"model.name_or_path={path!r}: cannot load {what}: {first[:300]}"
