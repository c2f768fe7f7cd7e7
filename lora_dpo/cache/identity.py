"""What makes reference log-probs what they are: the cache records it, a run compares it."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict
from typing import Any

import torch

from lora_dpo.cache.entries import ModelIdentity, ReferenceIdentity, ReferenceRun
from lora_dpo.cache.fingerprints import adapter_fingerprint, weights_fingerprint
from lora_dpo.cache.reader import ReferenceCache
from lora_dpo.config import Config
from lora_dpo.data import tokenization_settings
from lora_dpo.errors import CacheError
from lora_dpo.model import Precision, compute_dtype, resolve_model_dir

log = logging.getLogger(__name__)


def policy_precision(config: Config, device: torch.device) -> Precision:
    return Precision(config.model.quantization, compute_dtype(config.model.dtype, device))


def reference_precision(config: Config, device: torch.device) -> Precision:
    """ "policy" (the default) runs the reference exactly as the policy's frozen base runs."""
    mode = config.precompute.reference
    if mode == "policy":
        return policy_precision(config, device)
    return Precision("none", compute_dtype(mode, device))


def model_identity(config: Config) -> ModelIdentity:
    directory = resolve_model_dir(config.model)
    config_file = directory / "config.json" if directory else None
    return ModelIdentity(
        weights_sha256=weights_fingerprint(config.model),
        config_sha256=hashlib.sha256(config_file.read_bytes()).hexdigest()
        if config_file and config_file.is_file()
        else None,
        adapter_sha256=adapter_fingerprint(config.model),
    )


def reference_identity(config: Config, tokenizer: Any) -> ReferenceIdentity:
    """This run's identity (a hub model must be downloaded: its weights are fingerprinted)."""
    return ReferenceIdentity(model_identity(config), tokenization_settings(tokenizer, config.data))


def identity_stamp(identity: ReferenceIdentity, precision: dict[str, str]) -> str:
    """One string for an identity and precision, written into every shard: a leftover shard is
    reused only by a build of the same reference."""
    payload = json.dumps({"identity": identity.to_dict(), "reference": precision}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def identity_differences(
    cached: dict[str, Any],
    current: dict[str, Any],
    prefix: str = "",
    labels: tuple[str, str] = ("cache was built with", "this run uses"),
) -> list[str]:
    """Human-readable differences between two identity dicts, e.g.
    `tokenization.max_length: cache was built with 1024, this run uses 2048`."""
    differences = []
    for key in sorted(set(cached) | set(current)):
        name = f"{prefix}{key}"
        old, new = cached.get(key), current.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            differences += identity_differences(old, new, f"{name}.", labels)
        elif old != new:
            differences.append(f"{name}: {labels[0]} {old!r}, {labels[1]} {new!r}")
    return differences


def reference_differences(
    cached: tuple[ReferenceIdentity, ReferenceRun],
    other: tuple[ReferenceIdentity, ReferenceRun],
    labels: tuple[str, str] = ("cache was built with", "this run uses"),
) -> list[str]:
    """Where two references differ, identity and how the reference ran: one cache holds the
    values of one of them."""
    return identity_differences(cached[0].to_dict(), other[0].to_dict(), "", labels) + identity_differences(
        asdict(cached[1]), asdict(other[1]), "reference.", labels
    )


def open_checked_cache(
    config: Config,
    tokenizer: Any,
    precision: Precision,
    *,
    accept_mismatch: bool = False,
    shared_prefix: bool = False,
) -> ReferenceCache:
    """The reference cache, refused when it was built for another model, tokenizer, tokenization
    or (for a `policy` reference) precision; with `accept_mismatch` the differences are logged.
    `shared_prefix`: also the shared-prefix log-probs (LD-DPO), see ReferenceCache."""
    cache = ReferenceCache(config.precompute.cache_dir, shared_prefix=shared_prefix)
    manifest = cache.manifest
    differences = identity_differences(
        manifest.identity.to_dict(), reference_identity(config, tokenizer).to_dict()
    )
    reference = manifest.reference
    if reference.mode == "policy":
        differences += identity_differences(reference.precision, precision.to_dict(), prefix="precision.")
    else:
        log.info(
            "the reference ran at %s/%s by choice; the policy runs at %s/%s",
            reference.quantization,
            reference.dtype,
            *precision.to_dict().values(),
        )
    if differences and not accept_mismatch:
        raise CacheError(
            f"{cache.cache_dir}: reference cache does not match this run: {'; '.join(differences)} "
            "(build one for this reference with precompute-ref into another precompute.cache_dir, "
            "replace this one with precompute-ref --rebuild, or set train.accept_cache_mismatch=true)"
        )
    for difference in differences:
        log.warning("reference cache mismatch accepted: %s", difference)
    return cache
