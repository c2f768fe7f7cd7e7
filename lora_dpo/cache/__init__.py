"""The reference cache: per-pair reference log-probs computed once, checked, and read by training.

    format        names, shards (ShardRecords), what a sound value is
    manifest      manifest.json as a typed, validated Manifest
    fingerprints  the weights fingerprint and its memo
    identity      what a cache must match (Precision, reference identity, open_checked_cache)
    reader        ReferenceCache (load, check, align with a run's pairs)
    build         build_cache: score every pair once, resumable, torchrun-aware
    inspect       cache info / verify, and the one rendering of a manifest
    step0         the untrained policy against the cache, on the first batch
"""

from lora_dpo.cache.build import build_cache
from lora_dpo.cache.fingerprints import weights_fingerprint
from lora_dpo.cache.format import (
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST,
    ShardRecords,
    read_shard,
    shard_name,
    value_problems,
    write_shard,
)
from lora_dpo.cache.identity import (
    Precision,
    identity_differences,
    open_checked_cache,
    policy_precision,
    reference_identity,
    reference_precision,
)
from lora_dpo.cache.inspect import describe_cache, manifest_rows, verify_cache
from lora_dpo.cache.manifest import (
    Manifest,
    ModelIdentity,
    ReferenceIdentity,
    ReferenceRun,
    ShardEntry,
)
from lora_dpo.cache.reader import ReferenceCache, ReferenceValues
from lora_dpo.cache.step0 import check_step0_agreement, step0_tolerance_for

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "MANIFEST",
    "Manifest",
    "ModelIdentity",
    "Precision",
    "ReferenceCache",
    "ReferenceIdentity",
    "ReferenceRun",
    "ReferenceValues",
    "ShardEntry",
    "ShardRecords",
    "build_cache",
    "check_step0_agreement",
    "describe_cache",
    "identity_differences",
    "manifest_rows",
    "open_checked_cache",
    "policy_precision",
    "read_shard",
    "reference_identity",
    "reference_precision",
    "shard_name",
    "step0_tolerance_for",
    "value_problems",
    "verify_cache",
    "weights_fingerprint",
    "write_shard",
]
