"""What makes reference log-probs what they are: the cache records it, training compares it."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from typing import Any

import torch

from lora_dpo.cache import ReferenceCache, identity_differences
from lora_dpo.config import Config
from lora_dpo.data import tokenization_settings
from lora_dpo.errors import CacheError
from lora_dpo.model import compute_dtype, resolve_model_dir, weights_fingerprint

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Precision:
    quantization: str  # "nf4" | "none"
    dtype: torch.dtype  # compute dtype

    def to_dict(self) -> dict[str, str]:
        return {"quantization": self.quantization, "dtype": str(self.dtype).removeprefix("torch.")}


def policy_precision(config: Config, device: torch.device) -> Precision:
    return Precision(config.model.quantization, compute_dtype(config.model.dtype, device))


def reference_precision(config: Config, device: torch.device) -> Precision:
    """"policy" (the default) runs the reference exactly as the policy's frozen base runs."""
    mode = config.precompute.reference
    if mode == "policy":
        return policy_precision(config, device)
    return Precision("none", compute_dtype(mode, device))


def model_identity(config: Config) -> dict[str, Any]:
    """Weights and architecture fingerprints; not the path, so a cache moves between machines."""
    directory = resolve_model_dir(config.model)
    config_file = directory / "config.json" if directory else None
    return {
        "weights_sha256": weights_fingerprint(config.model),
        "config_sha256": hashlib.sha256(config_file.read_bytes()).hexdigest()
        if config_file and config_file.is_file()
        else None,
    }


def reference_identity(config: Config, tokenizer: Any) -> dict[str, Any]:
    """Everything that must match between a cache and a run, precision aside (see train)."""
    return {
        "model": model_identity(config),
        "tokenization": tokenization_settings(tokenizer, config.data),
    }


def open_checked_cache(
    config: Config, tokenizer: Any, precision: Precision, *, accept_mismatch: bool = False
) -> ReferenceCache:
    """The reference cache, refused when it was built for another model, tokenizer, tokenization
    or (for a `policy` reference) precision; with `accept_mismatch` the differences are logged."""
    cache = ReferenceCache(config.precompute.cache_dir)
    differences = identity_differences(cache.manifest["identity"], reference_identity(config, tokenizer))
    reference = cache.manifest["reference"]
    if reference["mode"] == "policy":
        cached = {"quantization": reference["quantization"], "dtype": reference["dtype"]}
        differences += identity_differences(cached, precision.to_dict(), prefix="precision.")
    else:
        log.info(
            "the reference ran at %s/%s by choice; the policy runs at %s/%s",
            reference["quantization"], reference["dtype"], *precision.to_dict().values(),
        )
    if differences and not accept_mismatch:
        raise CacheError(
            f"{cache.cache_dir}: reference cache does not match this run: {'; '.join(differences)} "
            "(rebuild it with precompute-ref, or set train.accept_cache_mismatch=true)"
        )
    for difference in differences:
        log.warning("reference cache mismatch accepted: %s", difference)
    return cache
