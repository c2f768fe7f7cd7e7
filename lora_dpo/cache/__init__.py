"""The reference cache: per-pair reference log-probs computed once, checked, shared, and read by training.

format        names, shards (ShardRecords, optional extra fields), what a sound value is
entries       the parts every manifest version shares, and checked JSON reading
manifest      manifest.json (format v2) as a typed, validated Manifest; manifest_v1 reads v1
fingerprints  the weights fingerprint and its memo
identity      what a cache must match (Precision, reference identity, open_checked_cache)
reader        ReferenceCache (load, check, align with a run's pairs); needs no lock
lock          the writer lock (flock on <cache>/.lock)
store         how a writer changes a cache without destroying anything valid
build         build_cache: score only the pairs the cache lacks; resumable, torchrun-aware
share         export to / import from one parquet table; merge caches of one reference
inspect       cache info / verify, and the one rendering of a manifest
overview      the reference's margins and the response lengths, in numbers and cache.png
step0         the untrained policy against the cache, on the first batch
"""

from lora_dpo.cache.build import build_cache
from lora_dpo.cache.entries import ModelIdentity, ReferenceIdentity, ReferenceRun, ShardEntry
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
from lora_dpo.cache.inspect import default_plot_path, describe_cache, manifest_rows, verify_cache
from lora_dpo.cache.lock import writer_lock
from lora_dpo.cache.manifest import Change, DataSet, Manifest
from lora_dpo.cache.manifest_v1 import ManifestV1
from lora_dpo.cache.overview import PairOverview
from lora_dpo.cache.reader import ReferenceCache, ReferenceValues
from lora_dpo.cache.share import export_cache, import_cache, merge_caches
from lora_dpo.cache.step0 import Step0Tolerance, check_step0_agreement, step0_tolerance_for
from lora_dpo.cache.store import unlisted_shards

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "MANIFEST",
    "Change",
    "DataSet",
    "Manifest",
    "ManifestV1",
    "ModelIdentity",
    "PairOverview",
    "Precision",
    "ReferenceCache",
    "ReferenceIdentity",
    "ReferenceRun",
    "ReferenceValues",
    "ShardEntry",
    "ShardRecords",
    "Step0Tolerance",
    "build_cache",
    "check_step0_agreement",
    "default_plot_path",
    "describe_cache",
    "export_cache",
    "identity_differences",
    "import_cache",
    "manifest_rows",
    "merge_caches",
    "open_checked_cache",
    "policy_precision",
    "read_shard",
    "reference_identity",
    "reference_precision",
    "shard_name",
    "step0_tolerance_for",
    "unlisted_shards",
    "value_problems",
    "verify_cache",
    "weights_fingerprint",
    "write_shard",
    "writer_lock",
]
