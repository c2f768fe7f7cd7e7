"""`lora-dpo merge`: fold a LoRA adapter into its base and save a plain transformers model.

Two modes, chosen explicitly:

- `nf4-dequantized` (the default for a QLoRA adapter): the base is quantized to nf4 exactly as
  in training, then each 4-bit weight is dequantized and the adapter's B·A·scaling added. This
  is the model the adapter was trained against, so the merged model reproduces base+adapter
  as trained. Merging into the original weights instead adds the quantization error
  (original - dequantized) to every layer, an error the adapter never saw.
- `original`: the adapter is added to the original weights. The default when the adapter was
  trained on an unquantized base (`model.quantization=none`).

Memory: the base is loaded once (4-bit in `nf4-dequantized` mode) and merged module by module.
Each merged weight is built in fp32 (one layer's worth of scratch), cast to the target dtype
and put in place of its 4-bit or LoRA-wrapped module, which is then freed. Peak memory is one
copy of the model at the target dtype plus one layer in fp32. The merged copy stays on the GPU
only when it fits there (`--device`, lora_dpo.merge_device); otherwise each merged layer moves
to the CPU as it is built. The verification re-load of the saved model happens after the
in-memory copy is released, on the merged copy's device.

The output is written to a hidden temp directory beside the target and renamed into place at
the end: an interrupted merge leaves no directory at the target.
"""

from __future__ import annotations

import gc
import json
import logging
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from lora_dpo.adapter_start import read_start_record, stacked_under
from lora_dpo.adapters import (
    ADAPTER_CONFIG,
    Adapter,
    check_against_files,
    check_mergeable,
    check_mergeable_layer,
    read_adapter,
)
from lora_dpo.config import ModelConfig, config_from_dict
from lora_dpo.errors import ConfigError
from lora_dpo.fileio import staged_directory, write_json
from lora_dpo.hub import looks_like_hub_name
from lora_dpo.merge_device import load_device, place_merged, requested_device
from lora_dpo.merge_verify import FP32_TOLERANCE, VERIFY_PROMPTS, encode_prompts, logits_at, verify
from lora_dpo.model import (
    DTYPES,
    compute_dtype,
    load_adapter,
    load_base_model,
    resolve_model_dir,
)
from lora_dpo.run.directory import RunDirectory
from lora_dpo.versions import package_versions

log = logging.getLogger(__name__)

MODES = ("nf4-dequantized", "original")
REPORT = "merge_report.json"


@dataclass
class AdapterSource:
    adapter: Adapter
    base: str  # base model path or hub name
    base_origin: str  # where `base` came from, for error messages
    model: ModelConfig  # how training loaded the base (defaults when there is no run config)
    trained_quantization: str  # "nf4" | "none"
    run_config: Path | None  # the train run's config.yaml, when there is one

    @property
    def adapter_dir(self) -> Path:
        return self.adapter.directory


def find_adapter(path: str | Path, base: str | None = None) -> AdapterSource:
    """A train run directory (RUN or RUN/adapter) or any PEFT LoRA adapter directory, checked
    against its base (the adapter's own, or `base` from --base) as far as files allow."""
    adapter = read_adapter(path)
    check_mergeable(adapter)
    stacked = stacked_under(adapter, read_start_record(adapter.directory))  # stacked: fold both
    if stacked is not None:
        check_mergeable(stacked)
    adapter_dir = adapter.directory
    run = RunDirectory(adapter_dir.parent)
    in_run = adapter_dir == run.adapter_dir and run.config_path.is_file()
    problem = run.adapter_problem() if in_run else None
    if problem is not None:
        raise ConfigError(
            f"--adapter {path}: the run's adapter is incomplete ({problem}); resume or retrain the run"
        )
    model = ModelConfig()
    run_config: Path | None = run.config_path
    if in_run:
        import yaml

        try:
            model = config_from_dict(yaml.safe_load(run.config_path.read_text())).model
        except (ConfigError, yaml.YAMLError, AttributeError) as exc:
            log.warning("%s: not read (%s); using default base settings", run_config, exc)
            run_config = None
    else:
        run_config = None
    name = base or adapter.recorded_base
    if not name:
        raise ConfigError(
            f"{adapter_dir / ADAPTER_CONFIG}: no base_model_name_or_path; give the base with --base"
        )
    model.name_or_path = name
    origin = "--base" if base else f"{adapter_dir / ADAPTER_CONFIG} base_model_name_or_path"
    source = AdapterSource(adapter, name, origin, model, model.quantization, run_config)
    _check_base(source)
    for part in (adapter, stacked) if stacked is not None else (adapter,):
        check_against_files(part, resolve_model_dir(model), name)
    return source


def _check_base(source: AdapterSource) -> None:
    """A local-looking base path that does not exist: say where it came from, before any load."""
    path = Path(source.base).expanduser()
    if not looks_like_hub_name(source.base) and not path.is_dir():
        what = "a file, not a model directory" if path.exists() else "no such directory"
        raise ConfigError(
            f"base model {source.base!r} (from {source.base_origin}): {what}; give the base model with --base"
        )


def resolve_mode(mode: str | None, source: AdapterSource) -> tuple[str, str]:
    """(mode, why): the default is what training saw."""
    if mode is None:
        if source.trained_quantization == "none":
            return "original", "default: the adapter was trained on the unquantized base"
        return "nf4-dequantized", "default: the adapter was trained against the nf4 base"
    if mode not in MODES:
        raise ConfigError(f"--mode {mode!r}: must be one of {', '.join(MODES)}")
    if mode == "nf4-dequantized" and source.trained_quantization == "none":
        raise ConfigError(
            f"--mode nf4-dequantized: {source.run_config} says the adapter was trained on the "
            "unquantized base (model.quantization=none); use --mode original"
        )
    return mode, "chosen"


def check_shard_size(max_shard_size: str) -> None:
    from transformers.utils.hub import convert_file_size_to_int

    try:
        convert_file_size_to_int(max_shard_size)
    except ValueError:
        raise ConfigError(f"--max-shard-size {max_shard_size!r}: expected a size like 5GB or 500MB") from None


def check_output(out: Path, source: AdapterSource, overwrite: bool) -> None:
    if out.exists() and not overwrite:
        raise ConfigError(f"--out {out}: already exists; choose another directory or pass --overwrite")
    inputs = [source.adapter_dir.resolve()]
    if Path(source.base).is_dir():
        inputs.append(Path(source.base).resolve())
    target = out.resolve()
    for directory in inputs:
        if target == directory or target in directory.parents or directory in target.parents:
            raise ConfigError(
                f"--out {out}: overlaps the input {directory}; write the merged model elsewhere"
            )


def merge(
    adapter: str | Path,
    out: str | Path,
    *,
    base: str | None = None,
    mode: str | None = None,
    dtype: str = "bf16",
    max_shard_size: str = "5GB",
    overwrite: bool = False,
    device: str | torch.device | None = "auto",
) -> dict[str, Any]:
    """Merge `adapter` into its base and write a standard model directory at `out`.

    `device`: "cpu", "cuda" or "auto" (lora_dpo.merge_device: the merged layers stay on the GPU
    only when they fit its free memory).

    Returns the merge report (also written to `out/merge_report.json`).
    """
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype {dtype!r}: must be one of {', '.join(DTYPES)}")
    check_shard_size(max_shard_size)
    out = Path(out)
    source = find_adapter(adapter, base)
    mode, why = resolve_mode(mode, source)
    check_output(out, source, overwrite)
    target_dtype = DTYPES[dtype]
    requested = requested_device(device)
    device = load_device(requested)

    stale = sorted(out.parent.glob(f".{out.name}.*.partial")) if out.parent.is_dir() else []
    if stale:
        log.warning(
            "left by interrupted merges (safe to delete unless one is running): %s",
            ", ".join(map(str, stale)),
        )

    tokenizer = _load_tokenizer(source)
    # nf4: the quantized values depend on the dtype the weights are loaded in; use training's.
    load_dtype = compute_dtype(source.model.dtype, device) if mode == "nf4-dequantized" else target_dtype
    model = _load_as_trained(source, mode, load_dtype, device)
    encoded = encode_prompts(tokenizer, VERIFY_PROMPTS, device)
    reference = logits_at(model, encoded)  # base + adapter, unmerged: what merging must reproduce
    devices = place_merged(requested, model, target_dtype, device)
    log.info("merged layers on %s: %s", devices.merged, devices.reason)
    state, counts = merge_to_state_dict(model, target_dtype, devices.merged)
    del model
    merged = _plain_model(source, state, target_dtype)
    del state

    # Written into a hidden .<out>.*.partial directory; published as `out` only when complete.
    with staged_directory(out) as tmp:
        merged.save_pretrained(str(tmp), max_shard_size=max_shard_size)
        del merged
        gc.collect()
        tokenizer.save_pretrained(str(tmp))
        _check_plain_config(tmp / "config.json")
        verification = verify(
            tmp, encoded, reference, target_dtype, devices.merged, source.model.trust_remote_code
        )
        report = {
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "adapter": str(source.adapter_dir),
            "base_model": source.base,
            "mode": mode,
            "mode_reason": why,
            "start": _start_report(source.adapter_dir),
            "dtype": dtype,
            "base_load_dtype": str(load_dtype).removeprefix("torch."),
            "device": {"load": str(devices.load), "merged": str(devices.merged), "reason": devices.reason},
            "max_shard_size": max_shard_size,
            **counts,
            "verification": {
                "reference": "nf4 base + adapter, unmerged (as trained)"
                if mode == "nf4-dequantized"
                else f"original base at {dtype} + adapter, unmerged",
                **verification,
            },
            "versions": package_versions(),
        }
        write_json(tmp / REPORT, report)  # last file: a directory with it is complete
    _print_summary(report, out)
    return report


def merge_to_state_dict(
    peft_model: torch.nn.Module, dtype: torch.dtype, device: torch.device | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """Fold every LoRA layer into its base weight and dequantize every 4-bit layer, in place,
    one module at a time; returns the plain model's state dict at `dtype` and the counts.

    Each layer is dequantized and folded where it lives; its merged weight, cast to `dtype`
    there, then moves to `device` (None: stays), so a model merged onto the CPU needs only one
    layer of scratch on the GPU."""
    import bitsandbytes as bnb
    from peft.tuners.lora import LoraLayer

    model = peft_model.get_base_model()  # the transformers model, with LoRA layers injected
    # Names only: a list of the modules themselves would keep every replaced one alive.
    lora_layers = [name for name, m in model.named_modules() if isinstance(m, LoraLayer)]
    for name in lora_layers:
        check_mergeable_layer(name, model.get_submodule(name))
    for name in tqdm(lora_layers, desc="merge", unit="layer"):
        module = model.get_submodule(name)
        base = module.get_base_layer()
        weight = full_precision_weight(base)  # [out, in] fp32: the one layer of scratch
        for adapter in module.active_adapters:
            if adapter in module.lora_A:
                lora_a = module.lora_A[adapter].weight.float()  # [r, in]
                lora_b = module.lora_B[adapter].weight.float()  # [out, r]
                weight = weight + (lora_b @ lora_a) * module.scaling[adapter]
        _replace(model, name, _linear(weight, base.bias, dtype, device))
        _release(base)
        del weight, base, module  # the 4-bit (or original) layer and its adapter are freed here
    quantized = [name for name, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    for name in quantized:  # 4-bit layers the adapter does not touch
        module = model.get_submodule(name)
        _replace(model, name, _linear(full_precision_weight(module), module.bias, dtype, device))
        _release(module)
        del module
    for param in model.parameters():  # embeddings, norms, head: one tensor at a time
        param.data = param.data.to(dtype).to(device or param.device)  # no copy when already there
    state = {key: t.to(device or t.device) for key, t in model.state_dict().items()}  # buffers too
    return state, {"merged_layers": len(lora_layers), "dequantized_layers": len(quantized)}


def full_precision_weight(layer: torch.nn.Module) -> torch.Tensor:
    """A linear layer's weight in fp32: bitsandbytes' dequantization for a 4-bit layer."""
    import bitsandbytes as bnb

    if isinstance(layer, bnb.nn.Linear4bit):
        weight = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
        return weight.float()
    if not isinstance(layer, torch.nn.Linear):
        raise ConfigError(f"cannot merge into a {type(layer).__name__}: only linear layers are supported")
    return layer.weight.detach().float()


def _linear(
    weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype, device: torch.device | None
) -> torch.nn.Linear:
    """Cast where the weight was built (the smaller copy crosses to `device`, None: stays)."""
    out_features, in_features = weight.shape
    layer = torch.nn.Linear(in_features, out_features, bias=bias is not None, device="meta")
    layer.weight = torch.nn.Parameter(weight.to(dtype).to(device or weight.device), requires_grad=False)
    if bias is not None:
        layer.bias = torch.nn.Parameter(
            bias.detach().to(dtype).to(device or bias.device), requires_grad=False
        )
    return layer


def _release(layer: torch.nn.Module) -> None:
    """Drop a replaced layer's weight now. A bitsandbytes 4-bit weight points back at its
    module (`Params4bit.module`): that cycle would keep both alive until a garbage collection."""
    layer.weight = None


def _replace(root: torch.nn.Module, name: str, module: torch.nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, module)


def _start_report(adapter_dir: Path) -> dict[str, str] | None:
    """What the adapter started from; for `stack` its folded copy, adapter_dir/sft, too."""
    start = read_start_record(adapter_dir)
    return None if start is None else start.to_dict()


def _load_tokenizer(source: AdapterSource):
    from transformers import AutoTokenizer

    where = source.adapter_dir if (source.adapter_dir / "tokenizer_config.json").is_file() else source.base
    try:
        return AutoTokenizer.from_pretrained(str(where), trust_remote_code=source.model.trust_remote_code)
    except OSError as exc:
        raise ConfigError(f"cannot load a tokenizer from {where}: {exc}") from None


def _load_as_trained(source: AdapterSource, mode: str, dtype: torch.dtype, device: torch.device):
    """Base + adapter, unmerged: the nf4 base (loaded in `dtype`, then quantized, as in
    training) or the original base at `dtype`."""
    try:
        base = load_base_model(source.model, quantize=mode == "nf4-dequantized", dtype=dtype, device=device)
    except ConfigError as exc:
        raise ConfigError(f"base model {source.base!r} (from {source.base_origin}): {exc}") from None
    model = load_adapter(base, source.adapter)
    model.eval()
    return model


def _plain_model(source: AdapterSource, state: dict[str, torch.Tensor], dtype: torch.dtype):
    """A fresh transformers model (no quantizer, no peft) holding the merged tensors."""
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    trust = source.model.trust_remote_code
    config = AutoConfig.from_pretrained(source.base, trust_remote_code=trust)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # a pre-quantized base: the merged weights are plain
    with torch.device("meta"):  # no memory: the merged tensors are assigned below
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust)
    result = model.load_state_dict(state, strict=False, assign=True)
    if result.missing_keys or result.unexpected_keys:
        raise RuntimeError(f"merged weights do not fit the model: {result}")
    model.tie_weights()
    try:
        model.generation_config = GenerationConfig.from_pretrained(source.base)
    except OSError:  # the base has no generation_config.json: the one from_config made stays
        pass
    return model


def _check_plain_config(path: Path) -> None:
    config = json.loads(path.read_text())
    leftovers = [key for key in ("quantization_config", "peft_config", "adapter_config") if key in config]
    if leftovers:
        raise RuntimeError(f"{path}: still holds {leftovers}")


def _print_summary(report: dict[str, Any], out: Path) -> None:
    check = report["verification"]
    print(
        f"merged {report['merged_layers']} LoRA layers ({report['mode']}, {report['dtype']}) -> {out}\n"
        f"verification against {check['reference']}: {check['positions']} positions, "
        f"max |Δlogit| {check['max_abs_diff']:.2e}, mean {check['mean_abs_diff']:.2e}, "
        f"argmax agreement {check['argmax_agreement']:.4f}"
    )
    if not check["argmax_all_agree"]:
        log.warning("merged model's argmax differs from base+adapter at some positions; see %s", out / REPORT)
    if report["dtype"] == "fp32" and check["max_abs_diff"] > FP32_TOLERANCE:
        log.warning(
            "max |Δlogit| %.2e exceeds the fp32 tolerance %.0e", check["max_abs_diff"], FP32_TOLERANCE
        )
