"""One cache per reference, grown by content: precompute-ref scores only the pairs the cache
lacks (counted at the model), a subset scores nothing, two data sets share a cache, another
reference is refused until --rebuild, and a format v1 cache is upgraded without rescoring."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch

from cache_edit import as_v1_cache, counted_pairs, write_rows
from lora_dpo.cache import Manifest, ReferenceCache, build_cache, step0_tolerance_for, verify_cache
from lora_dpo.cache.step0 import TOLERANCES
from lora_dpo.cli import main as cli_main
from lora_dpo.config import dump_config
from lora_dpo.demo import demo_config
from lora_dpo.errors import CacheError
from lora_dpo.inputs import load_run_inputs


@pytest.fixture(scope="module")
def workdir(demo_workdir, tmp_path_factory):
    root = tmp_path_factory.mktemp("incremental")
    for part in ("model", "data"):
        shutil.copytree(demo_workdir / part, root / part)
    return root


@pytest.fixture(scope="module")
def rows(workdir) -> list[str]:
    return (workdir / "data" / "train.jsonl").read_text().splitlines()


def config_for(
    workdir: Path, cache_dir: Path, train_file: Path, *, batch_size: int = 8, eval_file: Path | None = None
):
    config = demo_config(workdir)
    config.data.train_path = str(train_file)
    config.data.eval_path = str(eval_file) if eval_file else None
    config.train.generate_every = (
        0 if eval_file is None else config.train.generate_every
    )  # samples need held-out prompts
    config.precompute.cache_dir = str(cache_dir)
    config.train.layout = (
        "padded"  # counted_pairs counts padded batches; the cache is the same in every layout
    )
    config.precompute.shard_size = 16
    config.precompute.batch_size = batch_size
    config.train.output_dir = str(cache_dir.parent / "run")
    return config


def shard_bytes(cache_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(cache_dir.glob("shard-*.safetensors"))}


def gap_over_step0_bound(a: ReferenceCache, b: ReferenceCache) -> float:
    """Largest difference between two caches over the pairs of `a` (all in `b`), as a fraction
    of the step-0 bound for each response's length."""
    tolerance = step0_tolerance_for(b.manifest)
    assert tolerance is not None
    rows = [b.row_of[h] for h in a.pair_hashes]
    gaps = [
        (a.chosen_logps - b.chosen_logps[rows]).abs() / tolerance.bound(a.chosen_tokens),
        (a.rejected_logps - b.rejected_logps[rows]).abs() / tolerance.bound(a.rejected_tokens),
    ]
    return float(torch.cat(gaps).max())


@pytest.mark.parametrize("batch_size", [8, 1])
def test_adding_ten_percent_scores_only_the_new_pairs(workdir, rows, tmp_path, batch_size):
    """40 pairs, then the same 40 and 4 new ones, reshuffled: 4 pairs scored, the old shards
    untouched, and every value equal to a full rebuild's over the 44 (bit for bit with batches
    of one pair, whose composition is the same in both; within the step-0 fp32 tolerance with
    batches of 8, whose members differ)."""
    cache_dir = tmp_path / "cache"
    first = write_rows(tmp_path / "first.jsonl", rows[:40])
    grown = rows[:44]
    random.Random(0).shuffle(grown)
    second = write_rows(tmp_path / "second.jsonl", grown)

    with counted_pairs() as scored:
        build_cache(config_for(workdir, cache_dir, first, batch_size=batch_size))
    assert sum(scored) == 40
    before = shard_bytes(cache_dir)

    with counted_pairs() as scored:
        build_cache(config_for(workdir, cache_dir, second, batch_size=batch_size))
    assert sum(scored) == 4
    after = shard_bytes(cache_dir)
    assert {name: after[name] for name in before} == before  # not rewritten, not rescored
    manifest = Manifest.read(cache_dir)
    assert [entry.pairs for entry in manifest.shards] == [16, 16, 8, 4]
    assert [(d.split, d.report.source, d.pairs) for d in manifest.datasets] == [
        ("train", str(first), 40),
        ("train", str(second), 44),
    ]
    assert [(c.what, c.added, c.scored) for c in manifest.history] == [
        ("precompute-ref", 40, 40),
        ("precompute-ref", 4, 4),
    ]

    full_dir = tmp_path / "full"
    with counted_pairs() as scored:
        build_cache(config_for(workdir, full_dir, second, batch_size=batch_size))
    assert sum(scored) == 44
    incremental, full = ReferenceCache(cache_dir), ReferenceCache(full_dir)
    assert sorted(incremental.pair_hashes) == sorted(full.pair_hashes)
    rows_in_full = [full.row_of[h] for h in incremental.pair_hashes]
    assert torch.equal(incremental.chosen_tokens, full.chosen_tokens[rows_in_full])
    assert torch.equal(incremental.rejected_tokens, full.rejected_tokens[rows_in_full])
    if batch_size == 1:
        assert torch.equal(incremental.chosen_logps, full.chosen_logps[rows_in_full])
        assert torch.equal(incremental.rejected_logps, full.rejected_logps[rows_in_full])
    else:
        assert step0_tolerance_for(full.manifest) == TOLERANCES["float32"]  # 1e-4 nats per token
        assert gap_over_step0_bound(incremental, full) <= 1
    assert verify_cache(cache_dir) == ([], 44)


def test_a_subset_scores_nothing(workdir, rows, tmp_path):
    cache_dir = tmp_path / "cache"
    build_cache(config_for(workdir, cache_dir, write_rows(tmp_path / "all.jsonl", rows[:40])))
    subset = rows[5:25]
    random.Random(1).shuffle(subset)
    subset_file = write_rows(tmp_path / "subset.jsonl", subset)
    shards = shard_bytes(cache_dir)

    with counted_pairs() as scored:
        build_cache(config_for(workdir, cache_dir, subset_file))
    assert scored == []
    assert shard_bytes(cache_dir) == shards
    manifest = Manifest.read(cache_dir)
    assert [d.report.source for d in manifest.datasets] == [str(tmp_path / "all.jsonl"), str(subset_file)]
    assert manifest.history[-1].added == 0

    # The same subset again: nothing to score and nothing to write.
    manifest_bytes = (cache_dir / "manifest.json").read_bytes()
    with counted_pairs() as scored:
        build_cache(config_for(workdir, cache_dir, subset_file))
    assert scored == []
    assert (cache_dir / "manifest.json").read_bytes() == manifest_bytes
    assert len(load_run_inputs(config_for(workdir, cache_dir, subset_file)).reference) == 20


def test_two_data_sets_share_one_cache(workdir, rows, tmp_path):
    """Two different data sets (and an eval set) in one cache; training reads either."""
    cache_dir = tmp_path / "cache"
    one, two = write_rows(tmp_path / "one.jsonl", rows[:30]), write_rows(tmp_path / "two.jsonl", rows[30:60])
    held_out = write_rows(tmp_path / "eval.jsonl", rows[100:110])
    with counted_pairs() as scored:
        build_cache(config_for(workdir, cache_dir, one, eval_file=held_out))
    assert sum(scored) == 40
    with counted_pairs() as scored:
        build_cache(config_for(workdir, cache_dir, two, eval_file=held_out))
    assert sum(scored) == 30  # the eval set is cached already

    manifest = Manifest.read(cache_dir)
    assert manifest.pairs == {"train": 60, "eval": 10}
    assert [(d.split, d.report.source) for d in manifest.datasets] == [
        ("train", str(one)),
        ("eval", str(held_out)),
        ("train", str(two)),
    ]
    first, second = (
        load_run_inputs(config_for(workdir, cache_dir, f, eval_file=held_out)) for f in (one, two)
    )
    assert len(first.reference) == len(second.reference) == 30
    assert len(first.eval_reference) == 10
    cache = ReferenceCache(cache_dir)
    assert torch.equal(
        first.reference.chosen_logps, cache.chosen_logps[[cache.row_of[p.pair_hash] for p in first.pairs]]
    )


def test_another_reference_is_refused_and_rebuild_replaces_it(workdir, rows, tmp_path, capsys):
    cache_dir = tmp_path / "cache"
    data = write_rows(tmp_path / "data.jsonl", rows[:20])
    build_cache(config_for(workdir, cache_dir, data))
    manifest_bytes, shards = (cache_dir / "manifest.json").read_bytes(), shard_bytes(cache_dir)

    longer = config_for(workdir, cache_dir, data)
    longer.data.max_length = 128
    with pytest.raises(CacheError) as caught:
        build_cache(longer)
    assert "tokenization.max_length: cache was built with 64, this run uses 128" in str(caught.value)
    assert "precompute-ref --rebuild replaces the cache" in str(caught.value)
    unquantized = config_for(workdir, cache_dir, data)
    unquantized.precompute.reference = "fp32"
    with pytest.raises(
        CacheError,
        match=r"reference.mode: cache was built with 'policy', this run uses 'fp32'; "
        r"reference.quantization: cache was built with 'nf4', this run uses 'none'",
    ):
        build_cache(unquantized)
    assert (cache_dir / "manifest.json").read_bytes() == manifest_bytes
    assert shard_bytes(cache_dir) == shards

    config_file = tmp_path / "longer.yaml"
    config_file.write_text(dump_config(longer))
    assert cli_main(["precompute-ref", "--config", str(config_file)]) == 2
    assert "error: " in capsys.readouterr().err
    assert cli_main(["precompute-ref", "--rebuild", "--quiet", "--config", str(config_file)]) == 0
    rebuilt = Manifest.read(cache_dir)
    assert rebuilt.identity.tokenization["max_length"] == 128
    assert len(rebuilt.history) == 1 and rebuilt.total_pairs == 20
    assert not set(shards) & set(shard_bytes(cache_dir))  # the old shards are gone, numbers not reused
    assert verify_cache(cache_dir) == ([], 20)


def test_a_v1_cache_is_read_and_upgraded_without_rescoring(workdir, rows, tmp_path, capsys):
    cache_dir = tmp_path / "cache"
    data, held_out = (
        write_rows(tmp_path / "data.jsonl", rows[:40]),
        write_rows(tmp_path / "eval.jsonl", rows[100:116]),
    )
    config = config_for(workdir, cache_dir, data, eval_file=held_out)
    build_cache(config)
    as_v1_cache(cache_dir)
    assert json.loads((cache_dir / "manifest.json").read_text())["version"] == 1
    shards = shard_bytes(cache_dir)

    # train / eval read it, info and verify describe it
    inputs = load_run_inputs(config)
    assert len(inputs.reference) == 40 and len(inputs.eval_reference) == 16
    assert cli_main(["cache", "info", str(cache_dir)]) == 0
    out = capsys.readouterr().out
    assert "format: lora-dpo-reference-cache v1" in out and "pairs: train 40, eval 16" in out
    assert verify_cache(cache_dir) == ([], 56)

    # The first precompute on it writes a v2 manifest over the same shards and scores nothing.
    with counted_pairs() as scored:
        build_cache(config)
    assert scored == []
    assert shard_bytes(cache_dir) == shards
    upgraded = Manifest.read(cache_dir)
    assert upgraded.version == 2 and json.loads((cache_dir / "manifest.json").read_text())["version"] == 2
    assert [c.what for c in upgraded.history] == ["precompute-ref (format v1)", "precompute-ref"]
    assert [(d.split, d.pairs) for d in upgraded.datasets] == [("train", 40), ("eval", 16)]

    more = config_for(workdir, cache_dir, write_rows(tmp_path / "more.jsonl", rows[:44]), eval_file=held_out)
    with counted_pairs() as scored:
        build_cache(more)
    assert sum(scored) == 4
    assert [entry.file for entry in Manifest.read(cache_dir).shards][-1] == "shard-00004.safetensors"
    assert verify_cache(cache_dir) == ([], 60)
