"""Run the frozen reference over every pair once; store per-pair log-prob sums in shards."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from lora_dpo.batching import collate, length_sorted_batches, pad_id_of
from lora_dpo.cache import (
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST,
    ShardRecords,
    read_shard,
    shard_metadata,
    shard_name,
    write_shard,
)
from lora_dpo.config import Config, dump_config
from lora_dpo.errors import CacheError
from lora_dpo.fileio import sha256_file, write_json, write_text
from lora_dpo.data import TokenizedPair, load_preference_data
from lora_dpo.distributed import barrier, dist_info
from lora_dpo.identity import Precision, reference_identity, reference_precision
from lora_dpo.logps import sequence_logps
from lora_dpo.model import default_device, load_base_model, load_tokenizer
from lora_dpo.versions import package_versions

log = logging.getLogger(__name__)


def precompute_reference(config: Config) -> Path:
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
    identity = reference_identity(config, tokenizer)  # after the load: a hub model is local now
    # A shard is reused on resume only if it was written for this exact reference and data.
    stamp = _identity_stamp(identity, precision)
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
        if _reusable_shard(path, shard_pairs, stamp):
            progress.update(len(shard_pairs))
        else:
            records = _score(model, shard_pairs, config, pad_id, device, progress)
            write_shard(path, records, spec.split, extra_metadata={"identity": stamp})
    progress.close()
    barrier()  # every shard is on disk
    if not info.is_main:
        return cache_dir
    shards = [
        {"file": spec.file, "split": spec.split, "pairs": len(spec.indices), "sha256": sha256_file(cache_dir / spec.file)}
        for spec in plan
    ]
    elapsed = time.perf_counter() - started

    manifest = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "identity": identity,
        "reference": {"mode": config.precompute.reference, **precision.to_dict()},
        "data": {split: report.to_dict() for split, (_, report) in splits.items()},
        "pairs": {split: len(pairs) for split, (pairs, _) in splits.items()},
        "shards": shards,
        "seconds": round(elapsed, 2),
        "versions": package_versions(),
    }
    write_text(cache_dir / "config.yaml", dump_config(config))
    write_json(cache_dir / MANIFEST, manifest)
    _remove_stale_shards(cache_dir, keep={entry["file"] for entry in shards})
    total = sum(len(pairs) for pairs, _ in splits.values())
    log.info("reference cache: %s (%d pairs, %.1f s)", cache_dir, total, elapsed)
    return cache_dir


def _remove_stale_shards(cache_dir: Path, keep: set[str]) -> None:
    """Shards left by an earlier, larger build of this cache are not part of it any more."""
    for path in cache_dir.glob("shard-*.safetensors"):
        if path.name not in keep:
            path.unlink()


def _identity_stamp(identity: dict[str, Any], precision: Precision) -> str:
    payload = json.dumps({"identity": identity, "reference": precision.to_dict()}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


@dataclass(frozen=True)
class ShardSpec:
    file: str
    split: str
    indices: list[int]  # into the split's pairs, in scoring order


def plan_shards(splits: dict[str, tuple[Sequence[TokenizedPair], Any]], config: Config) -> list[ShardSpec]:
    """Each split in length-sorted order (little padding), cut into shards of `shard_size` pairs;
    shards are numbered across splits. Deterministic: resume and ranks rely on it."""
    specs: list[ShardSpec] = []
    size = config.precompute.shard_size
    for split, (pairs, _) in splits.items():
        order = [i for batch in length_sorted_batches(pairs, config.precompute.batch_size) for i in batch]
        for offset in range(0, len(order), size):
            specs.append(ShardSpec(shard_name(len(specs)), split, order[offset : offset + size]))
    return specs


def _reusable_shard(path: Path, pairs: Sequence[TokenizedPair], stamp: str) -> bool:
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


@torch.no_grad()
def _score(
    model: torch.nn.Module,
    pairs: Sequence[TokenizedPair],
    config: Config,
    pad_id: int,
    device: torch.device,
    progress: tqdm,
) -> ShardRecords:
    chosen, rejected, chosen_tokens, rejected_tokens = [], [], [], []
    batch_size = config.precompute.batch_size
    for start in range(0, len(pairs), batch_size):
        batch = collate(pairs[start : start + batch_size], pad_id).to(device)
        out = sequence_logps(model, batch)
        chosen.append(out.chosen.cpu())
        rejected.append(out.rejected.cpu())
        chosen_tokens.append(out.chosen_tokens.cpu())
        rejected_tokens.append(out.rejected_tokens.cpu())
        progress.update(batch.num_pairs)
    return ShardRecords(
        pair_hashes=[p.pair_hash for p in pairs],
        chosen_logps=torch.cat(chosen),
        rejected_logps=torch.cat(rejected),
        chosen_tokens=torch.cat(chosen_tokens),
        rejected_tokens=torch.cat(rejected_tokens),
        source_indices=torch.tensor([p.source_index for p in pairs], dtype=torch.long),
    )
