"""precompute-ref: make the cache cover a config's data, running the frozen reference only on
pairs the cache does not hold yet. Resumable, safe to kill (see store), torchrun-aware.

New pairs of each split are sorted by length (little padding), cut into shards of
`precompute.shard_size` pairs and scored in consecutive batches of `precompute.batch_size`.
A pair's batch therefore depends on which pairs were new with it. Its values do not, beyond
float rounding: GPU kernels may round the last bits differently for a batch of another shape,
far below the step-0 tolerance (on the CPU they come out bit-identical). With
`precompute.batch_size=1` a pair's values depend on the pair alone, on any device.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from lora_dpo.batching import length_sorted_batches, packed_length, pad_id_of
from lora_dpo.cache.entries import ReferenceRun, ShardEntry
from lora_dpo.cache.format import (
    CONFIG,
    FORMAT_VERSION,
    SHARED_PREFIX_FIELDS,
    ShardRecords,
    read_shard,
    shard_fields,
    shard_header,
    shard_metadata,
    shard_name,
    shard_path,
    write_shard,
)
from lora_dpo.cache.identity import Precision, identity_stamp, reference_identity, reference_precision
from lora_dpo.cache.lock import writer_lock
from lora_dpo.cache.manifest import PAIRED, UNPAIRED, Change, DataSet, Manifest
from lora_dpo.cache.store import (
    check_same_reference,
    commit,
    current_manifest,
    listed_pairs,
    next_shard_number,
    readable_manifest,
)
from lora_dpo.config import Config, dump_config
from lora_dpo.data import TokenizedPair, load_preference_data
from lora_dpo.distributed import DistInfo, dist_info, wait_for_ranks
from lora_dpo.errors import CacheError
from lora_dpo.faults import FaultHooks
from lora_dpo.fileio import sha256_file, write_text
from lora_dpo.losses import LossSettings
from lora_dpo.model import default_device, load_reference_at, load_tokenizer, resolve_model_dir
from lora_dpo.packing import Layout, choose_layout
from lora_dpo.rank_work import balanced_assignment
from lora_dpo.scoring import score_pairs

log = logging.getLogger(__name__)

REBUILD = "precompute-ref --rebuild replaces the cache"


def build_cache(config: Config, *, rebuild: bool = False, wait: bool = True) -> Path:
    """Make the cache at `config.precompute.cache_dir` cover the config's data; returns its path.

    Pairs already in the cache are not scored again; a cache of another reference is refused
    (`rebuild` replaces it instead, still only once the new one is complete). `wait=False`
    fails at once when another process is writing the cache.
    """
    cache_dir = Path(config.precompute.cache_dir)
    device = default_device()
    info = dist_info()
    tokenizer = load_tokenizer(config.model)
    loss = LossSettings.of(config.train)  # KTO's rows: each completion and its KL completion
    splits = {"train": load_preference_data(config.data, tokenizer, "train", unpaired=loss.unpaired)}
    if config.data.eval_path:
        splits["eval"] = load_preference_data(config.data, tokenizer, "eval", unpaired=loss.unpaired)
    for name, (_, report) in splits.items():
        log.info("%s data: %s", name, report.summary())

    precision = reference_precision(config, device)
    # A hub model not downloaded yet has no weights to fingerprint before it is loaded; a
    # local one is loaded only if there is something to score.
    reference_model = None if resolve_model_dir(config.model) else load_reference(config, precision, device)
    identity = reference_identity(config, tokenizer)
    reference = ReferenceRun(config.precompute.reference, **precision.to_dict())
    stamp = identity_stamp(identity, reference.precision)
    datasets = tuple(DataSet(split, report) for split, (_, report) in splits.items())

    # Rank 0 holds the lock; the other ranks read the same cache under it and plan alike.
    with writer_lock(cache_dir, wait=wait) if info.is_main else nullcontext():
        wait_for_ranks("the cache lock")  # rank 0 may wait long for another job's lock
        old = readable_manifest(cache_dir) if rebuild else current_manifest(cache_dir, REBUILD)
        current = None if rebuild else old
        if current is not None:
            hint = f"use another precompute.cache_dir for this reference, or {REBUILD}"
            check_same_reference(cache_dir, current, (identity, reference), hint)
            current.require_rows(loss.unpaired, cache_dir, config.train.loss_type)
        plan = plan_shards(splits, listed_pairs(cache_dir, current), config, next_shard_number(old))
        covered = current is not None and all(dataset in current.datasets for dataset in datasets)
        if current is not None and covered and not plan and current.version == FORMAT_VERSION:
            log.info("reference cache: %s already covers this data: nothing to score", cache_dir)
            return cache_dir

        started = time.perf_counter()
        mine = shards_of_rank(plan, splits, info)  # the same shards as one process would write
        FaultHooks.from_env().before_shards(info.rank)
        if mine and reference_model is None:
            reference_model = load_reference(config, precision, device)
        write_planned_shards(
            cache_dir,
            mine,
            splits,
            reference_model,
            stamp,
            config,
            device,
            pad_id_of(tokenizer),
            info.is_main,
        )
        wait_for_ranks("every shard on disk")  # the ranks finish within about a shard
        if not info.is_main:
            return cache_dir
        shards = tuple(
            ShardEntry(
                spec.file,
                spec.split,
                len(spec.indices),
                sha256_file(shard_path(cache_dir, spec.file)),
                shard_fields(shard_path(cache_dir, spec.file)),
            )
            for spec in plan
        )
        added = sum(entry.pairs for entry in shards)
        change = Change.of("precompute-ref", added=added, scored=added, seconds=time.perf_counter() - started)
        rows = UNPAIRED if loss.unpaired else PAIRED
        manifest = (current or Manifest.empty(identity, reference, rows)).with_additions(
            shards, datasets, change
        )
        write_text(cache_dir / CONFIG, dump_config(config))
        commit(cache_dir, manifest)
        log.info(
            "reference cache: %s: %d new pairs scored, %d in the cache, %d data set(s) covered (%.1f s)",
            cache_dir,
            added,
            manifest.total_pairs,
            len(manifest.datasets),
            change.seconds,
        )
    return cache_dir


def load_reference(
    config: Config, precision: Precision, device: torch.device
) -> tuple[torch.nn.Module, Layout]:
    """The frozen reference, and the batch layout it scores in (switched to its attention)."""
    model = load_reference_at(config.model, precision, device)  # base (+ model.adapter_path)
    model.eval()
    layout = choose_layout(config.train.layout, model, device)  # the cache does not depend on it
    log.info("%s", layout.describe(config.precompute.max_tokens_per_batch, config.precompute.batch_size))
    return model, layout


@dataclass(frozen=True)
class ShardSpec:
    file: str
    split: str
    indices: list[int]  # into the split's pairs, in scoring order


def plan_shards(
    splits: Mapping[str, tuple[Sequence[TokenizedPair], Any]],
    known: set[bytes],
    config: Config,
    first_number: int,
) -> list[ShardSpec]:
    """The pairs of each split the cache lacks, length-sorted and cut into shards of `shard_size`
    pairs, numbered from `first_number` across splits. Deterministic: resume and ranks rely on it.

    Like every write, it adds the pairs of its input the cache did not hold before it: a pair
    twice in the data is scored twice, as in format v1, so a first build holds its data's
    pairs exactly (a reader uses one of the two).
    """
    specs: list[ShardSpec] = []
    size = config.precompute.shard_size
    for split, (pairs, _) in splits.items():
        new = [index for index, pair in enumerate(pairs) if pair.pair_hash not in known]
        batches = length_sorted_batches([pairs[i] for i in new], config.precompute.batch_size)
        order = [new[i] for batch in batches for i in batch]
        for offset in range(0, len(order), size):
            specs.append(
                ShardSpec(shard_name(first_number + len(specs)), split, order[offset : offset + size])
            )
    return specs


def shards_of_rank(
    plan: Sequence[ShardSpec], splits: Mapping[str, tuple[Sequence[TokenizedPair], Any]], info: DistInfo
) -> list[ShardSpec]:
    """This rank's share of the planned shards, dealt by the tokens they hold (all of them in
    one process)."""
    tokens = [sum(packed_length(splits[spec.split][0][i]) for i in spec.indices) for spec in plan]
    return [plan[i] for i in balanced_assignment(tokens, info.world_size)[info.rank]]


def write_planned_shards(
    cache_dir: Path,
    specs: Sequence[ShardSpec],
    splits: Mapping[str, tuple[Sequence[TokenizedPair], Any]],
    reference_model: tuple[torch.nn.Module, Layout] | None,
    stamp: str,
    config: Config,
    device: torch.device,
    pad_id: int,
    show_progress: bool,
) -> None:
    # LD-DPO's statistic, for a config that will read it (an extra field other readers skip)
    shared_prefix = LossSettings.of(config.train).needs_shared_prefix
    quiet = {} if show_progress else {"disable": True}  # one bar per job, not per rank
    progress = tqdm(
        total=sum(len(spec.indices) for spec in specs), desc="reference log-probs", unit="pair", **quiet
    )
    for spec in specs:
        pairs = splits[spec.split][0]
        shard_pairs = [pairs[i] for i in spec.indices]
        path = shard_path(cache_dir, spec.file)
        if reusable_shard(path, shard_pairs, stamp):
            progress.update(len(shard_pairs))
            continue
        assert reference_model is not None, "the reference is loaded when there is a shard to score"
        model, layout = reference_model
        scores = score_pairs(
            model,
            shard_pairs,
            batch_size=config.precompute.batch_size,
            pad_id=pad_id,
            device=device,
            progress=progress,
            layout=layout.name,
            max_tokens=config.precompute.max_tokens_per_batch,
            shared_prefix=shared_prefix,
        )
        records = ShardRecords(
            pair_hashes=[p.pair_hash for p in shard_pairs],
            chosen_logps=scores.chosen,
            rejected_logps=scores.rejected,
            chosen_tokens=scores.chosen_tokens,
            rejected_tokens=scores.rejected_tokens,
            source_indices=torch.tensor([p.source_index for p in shard_pairs], dtype=torch.long),
        )
        if scores.shared_logps is not None:  # [2n], chosen first
            records.extras = dict(zip(SHARED_PREFIX_FIELDS, scores.shared_logps.chunk(2), strict=True))
        write_shard(path, records, shard_header(spec.split, stamp))
    progress.close()


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
