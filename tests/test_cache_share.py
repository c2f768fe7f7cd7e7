"""A cache leaves the machine as one parquet table and comes back bit for bit; caches of one
reference merge; another reference's values are refused, naming the difference."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from cache_edit import write_rows
from lora_dpo.cache import (
    Manifest,
    ModelIdentity,
    ReferenceCache,
    build_cache,
    export_cache,
    import_cache,
    merge_caches,
    verify_cache,
)
from lora_dpo.cli import main as cli_main
from lora_dpo.demo import demo_config
from lora_dpo.errors import CacheError


@pytest.fixture(scope="module")
def workdir(demo_workdir, tmp_path_factory):
    root = tmp_path_factory.mktemp("share")
    for part in ("model", "data"):
        shutil.copytree(demo_workdir / part, root / part)
    rows = (root / "data" / "train.jsonl").read_text().splitlines()
    write_rows(root / "a.jsonl", rows[:30])
    write_rows(root / "b.jsonl", rows[20:50])  # 10 pairs in common with a.jsonl
    write_rows(root / "eval.jsonl", (root / "data" / "eval.jsonl").read_text().splitlines()[:12])
    for name in ("a", "b"):
        build_cache(config_for(root, root / f"cache-{name}", root / f"{name}.jsonl"))
    return root


def config_for(root: Path, cache_dir: Path, train_file: Path):
    config = demo_config(root)
    config.data.train_path = str(train_file)
    config.data.eval_path = str(root / "eval.jsonl")
    config.precompute.cache_dir = str(cache_dir)
    config.precompute.shard_size = 8
    return config


def files(cache_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(cache_dir.glob("shard-*.safetensors"))}


def other_reference(cache_dir: Path, target: Path) -> Path:
    """A copy whose manifest names other weights: the same files, another reference."""
    shutil.copytree(cache_dir, target)
    manifest = Manifest.read(target)
    identity = dataclasses.replace(
        manifest.identity, model=ModelIdentity("0" * 64, manifest.identity.model.config_sha256)
    )
    dataclasses.replace(manifest, identity=identity).write(target)
    return target


def test_export_import_round_trip_is_bit_exact(workdir, tmp_path, capsys):
    source = workdir / "cache-a"
    table_file = tmp_path / "ref.parquet"
    assert cli_main(["cache", "export", str(source), "--out", str(table_file)]) == 0
    assert "cache export: 42 pairs" in capsys.readouterr().out

    # Plain tools read it: pandas and datasets, with the documented columns and dtypes.
    import datasets
    import pandas as pd

    frame = pd.read_parquet(table_file)
    assert list(frame.columns) == [
        "pair_hash",
        "chosen_logps",
        "rejected_logps",
        "chosen_tokens",
        "rejected_tokens",
        "source_index",
        "shard",
    ]
    assert [str(frame[c].dtype) for c in ("chosen_logps", "chosen_tokens", "source_index")] == [
        "float32",
        "int32",
        "int64",
    ]
    assert frame["pair_hash"].str.fullmatch(r"[0-9a-f]{64}").all()
    table = datasets.Dataset.from_parquet(str(table_file))
    assert table.num_rows == 42 and table.features["chosen_logps"].dtype == "float32"
    cache = ReferenceCache(source)
    assert bytes.fromhex(frame["pair_hash"][0]) == cache.pair_hashes[0]
    assert torch.equal(torch.from_numpy(frame["chosen_logps"].to_numpy().copy()), cache.chosen_logps)

    # The schema metadata carries the manifest: identity, reference precision, checksums.
    carried = json.loads(pq.read_schema(table_file).metadata[b"lora_dpo"])["manifest"]
    manifest = Manifest.read(source)
    assert carried["identity"] == manifest.identity.to_dict()
    assert carried["reference"] == {"mode": "policy", "quantization": "nf4", "dtype": "float32"}
    assert [s["sha256"] for s in carried["shards"]] == [s.sha256 for s in manifest.shards]

    target = tmp_path / "imported"
    assert cli_main(["cache", "import", str(table_file), "--into", str(target)]) == 0
    assert "cache import: 42 pairs added" in capsys.readouterr().out
    assert files(target) == files(source)
    imported = Manifest.read(target)
    assert (imported.identity, imported.reference, imported.shards, imported.datasets) == (
        manifest.identity,
        manifest.reference,
        manifest.shards,
        manifest.datasets,
    )
    assert imported.history[:-1] == manifest.history
    assert (imported.history[-1].what, imported.history[-1].added) == ("import ref.parquet", 42)
    assert verify_cache(target) == ([], 42)
    assert import_cache(table_file, target) == 0  # all there already


def test_import_refuses_another_reference_and_altered_tables(workdir, tmp_path):
    table_file = tmp_path / "ref.parquet"
    export_cache(workdir / "cache-a", table_file)
    other = other_reference(workdir / "cache-b", tmp_path / "other")
    before = (other / "manifest.json").read_bytes(), files(other)
    with pytest.raises(
        CacheError,
        match=rf"{table_file} holds another reference's values than {other}: "
        rf"model.weights_sha256: {other} has '0000",
    ):
        import_cache(table_file, other)
    assert ((other / "manifest.json").read_bytes(), files(other)) == before

    # A tool that re-writes the table (datasets here) drops the schema metadata: refused, in one line.
    import datasets

    rewritten = tmp_path / "rewritten.parquet"
    datasets.Dataset.from_parquet(str(table_file)).to_parquet(str(rewritten))
    with pytest.raises(
        CacheError, match=r"no lora_dpo metadata in the parquet schema: not an exported reference cache"
    ):
        import_cache(rewritten, tmp_path / "new")

    # One value changed, metadata kept: the shard does not come back to its checksum.
    table = pq.read_table(table_file)
    values = table.column("chosen_logps").to_numpy().copy()
    values[3] -= 1.0
    edited = table.set_column(1, "chosen_logps", pa.array(values))
    altered = tmp_path / "altered.parquet"
    pq.write_table(edited.replace_schema_metadata(table.schema.metadata), altered)
    with pytest.raises(CacheError, match=r"shard-00000.safetensors does not reproduce its checksum"):
        import_cache(altered, tmp_path / "new")
    assert not (tmp_path / "new" / "manifest.json").exists()
    assert list((tmp_path / "new").glob("shard-*")) == []


def test_merge_joins_two_caches_of_one_reference(workdir, tmp_path, capsys):
    a, b, joined = workdir / "cache-a", workdir / "cache-b", tmp_path / "joined"
    assert cli_main(["cache", "merge", str(a), str(b), "--into", str(joined)]) == 0
    # a: 30 train + 12 eval; b adds the 20 train pairs a lacks (its eval pairs are a's).
    assert f"cache merge: 62 pairs added to {joined}" in capsys.readouterr().out
    manifest = Manifest.read(joined)
    assert manifest.total_pairs == 62 and manifest.pairs == {"train": 50, "eval": 12}
    assert {name: data for name, data in files(joined).items() if name in files(a)} == files(
        a
    )  # a's shards as they are
    assert [d.report.source for d in manifest.datasets] == [
        str(workdir / "a.jsonl"),
        str(workdir / "eval.jsonl"),
        str(workdir / "b.jsonl"),
    ]
    assert verify_cache(joined) == ([], 62)
    cache, cache_a, cache_b = ReferenceCache(joined), ReferenceCache(a), ReferenceCache(b)
    for source in (cache_a, cache_b):
        rows = [cache.row_of[h] for h in source.pair_hashes]
        assert torch.equal(cache.chosen_logps[rows], source.chosen_logps)
        assert torch.equal(cache.rejected_tokens[rows], source.rejected_tokens)

    # Into one of the two: only what it lacks.
    into_a = tmp_path / "a"
    shutil.copytree(a, into_a)
    assert merge_caches([into_a, b], into_a) == 20
    assert Manifest.read(into_a).total_pairs == 62


def test_merge_refuses_another_reference(workdir, tmp_path):
    other = other_reference(workdir / "cache-b", tmp_path / "other")
    with pytest.raises(CacheError) as caught:
        merge_caches([workdir / "cache-a", other], tmp_path / "joined")
    message = str(caught.value)
    assert message.startswith(
        f"{other} holds another reference's values than {workdir / 'cache-a'}: model.weights_sha256:"
    )
    assert "\n" not in message
    assert not (tmp_path / "joined" / "manifest.json").exists()
