"""Build a reference cache: run the frozen reference over every pair once, write shards, then the
manifest. Resumable (complete shards of an interrupted build are reused) and torchrun-aware."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from lora_dpo.batching import length_sorted_batches, pad_id_of
from lora_dpo.cache.format import (
    CONFIG,
    MANIFEST,
    SHARD_GLOB,
    ShardRecords,
    read_shard,
    shard_metadata,
    shard_name,
    write_shard,
)
from lora_dpo.cache.identity import Precision, reference_identity, reference_precision
from lora_dpo.cache.manifest import (
    Manifest,
    ReferenceIdentity,
    ReferenceRun,
    ShardEntry,
)
from lora_dpo.config import Config, dump_config
from lora_dpo.data import TokenizedPair, load_preference_data
from lora_dpo.distributed import barrier, dist_info
from lora_dpo.errors import CacheError
from lora_dpo.fileio import sha256_file, write_text
from lora_dpo.model import default_device, load_base_model, load_tokenizer
from lora_dpo.packing import choose_layout
from lora_dpo.scoring import score_pairs
from lora_dpo.versions import package_versions

log = logging.getLogger(__name__)


def build_cache(config: Config) -> Path:
    """Build (or resume) the reference cache at `config.precompute.cache_dir`; returns its path."""
    cache_dir = Path(config.precompute.cache_dir)
    device = default_device()
    tokenizer = load_tokenizer(config.model)
    splits = {"train": load_preference_data(config.data, tokenizer, "train")}
    if config.data.eval_path:
        splits["eval"] = load_preference_data(config.data, tokenizer, "eval")
    for name, (_, report) in splits.items():
        log.info("%s data: %s", name, report.summary())

    precision = reference_precision(config, device)
    model = load_base_model(
        config.model, quantize=precision.quantization == "nf4", dtype=precision.dtype, device=device
    )
    model.eval()
    layout = choose_layout(config.train.layout, model, device)  # the cache does not depend on it
    log.info("%s", layout.describe(config.precompute.max_tokens_per_batch, config.precompute.batch_size))
    identity = reference_identity(config, tokenizer)  # after the load: a hub model is local now
    # A shard is reused on resume only if it was written for this exact reference and data.
    stamp = identity_stamp(identity, precision)
    # Until the new manifest is written the cache is incomplete: an interrupted rebuild must
    # not leave an old manifest pointing at shards that were rewritten since.
    if dist_info().is_main:
        (cache_dir / MANIFEST).unlink(missing_ok=True)
    barrier()

    started = time.perf_counter()
    plan = plan_shards(splits, config)
    info = dist_info()
    # Under torchrun each rank scores every world_size-th shard; the shards are the same as in
    # one process, so the cache is too.
    mine = plan[info.rank :: info.world_size]
    quiet = {} if info.is_main else {"disable": True}  # one bar per job, not per rank
    progress = tqdm(total=sum(len(spec.indices) for spec in mine), desc="reference log-probs", unit="pair", **quiet)
    pad_id = pad_id_of(tokenizer)
    for spec in mine:
        pairs = splits[spec.split][0]
        shard_pairs = [pairs[i] for i in spec.indices]
        path = cache_dir / spec.file
        if reusable_shard(path, shard_pairs, stamp):
            progress.update(len(shard_pairs))
            continue
        scores = score_pairs(
            model, shard_pairs, batch_size=config.precompute.batch_size, pad_id=pad_id, device=device, progress=progress,
            layout=layout.name, max_tokens=config.precompute.max_tokens_per_batch,
        )
        records = ShardRecords(
            pair_hashes=[p.pair_hash for p in shard_pairs],
            chosen_logps=scores.chosen,
            rejected_logps=scores.rejected,
            chosen_tokens=scores.chosen_tokens,
            rejected_tokens=scores.rejected_tokens,
            source_indices=torch.tensor([p.source_index for p in shard_pairs], dtype=torch.long),
        )
        write_shard(path, records, spec.split, extra_metadata={"identity": stamp})
    progress.close()
    barrier()  # every shard is on disk
    if not info.is_main:
        return cache_dir
    shards = tuple(
        ShardEntry(spec.file, spec.split, len(spec.indices), sha256_file(cache_dir / spec.file)) for spec in plan
    )
    elapsed = time.perf_counter() - started
    manifest = Manifest(
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        identity=identity,
        reference=ReferenceRun(config.precompute.reference, **precision.to_dict()),
        data={split: report for split, (_, report) in splits.items()},
        pairs={split: len(pairs) for split, (pairs, _) in splits.items()},
        shards=shards,
        seconds=round(elapsed, 2),
        versions=package_versions(),
    )
    write_text(cache_dir / CONFIG, dump_config(config))
    manifest.write(cache_dir)
    remove_stale_shards(cache_dir, keep={entry.file for entry in shards})
    total = sum(len(pairs) for pairs, _ in splits.values())
    log.info("reference cache: %s (%d pairs, %.1f s)", cache_dir, total, elapsed)
    return cache_dir


def remove_stale_shards(cache_dir: Path, keep: set[str]) -> None:
    """Shards left by an earlier, larger build of this cache are not part of it any more."""
    for path in cache_dir.glob(SHARD_GLOB):
        if path.name not in keep:
            path.unlink()


def identity_stamp(identity: ReferenceIdentity, precision: Precision) -> str:
    payload = json.dumps({"identity": identity.to_dict(), "reference": precision.to_dict()}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


@dataclass(frozen=True)
class ShardSpec:
    file: str
    split: str
    indices: list[int]  # into the split's pairs, in scoring order


def plan_shards(splits: Mapping[str, tuple[Sequence[TokenizedPair], Any]], config: Config) -> list[ShardSpec]:
    """Each split in length-sorted order (little padding), cut into shards of `shard_size` pairs;
    shards are numbered across splits. Deterministic: resume and ranks rely on it."""
    specs: list[ShardSpec] = []
    size = config.precompute.shard_size
    for split, (pairs, _) in splits.items():
        order = [i for batch in length_sorted_batches(pairs, config.precompute.batch_size) for i in batch]
        for offset in range(0, len(order), size):
            specs.append(ShardSpec(shard_name(len(specs)), split, order[offset : offset + size]))
    return specs


def reusable_shard(path: Path, pairs: Sequence[TokenizedPair], stamp: str) -> bool:
    """Whether `path` is a complete shard from an interrupted run, for the same pairs and reference."""
    if not path.is_file():
        return False
    try:
        if shard_metadata(path).get("identity") != stamp:
            return False
        records = read_shard(path)
    except CacheError:  # an unreadable leftover is simply recomputed
        return False
    if records.pair_hashes != [p.pair_hash for p in pairs]:
        return False
    log.info("resuming: reusing complete shard %s", path.name)
    return True
