"""manifest.json as a typed Manifest: a format v1 file reads back to the same bytes, and a damaged
one is a one-line CacheError naming the file and the field."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from lora_dpo.cache import Manifest, ManifestV1, ReferenceCache, ShardEntry
from lora_dpo.cache.format import SHARD_KEYS
from lora_dpo.errors import CacheError
from lora_dpo.report import _cache_lines

# Written by a build of the demo cache (48 + 48 pairs, shard_size 16) before Manifest existed.
V1 = Path(__file__).with_name("manifest_v1.json")


def cache_with(tmp_path: Path, text: str) -> Path:
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir()
    (cache_dir / "manifest.json").write_text(text)
    return cache_dir


def test_v1_manifest_reads_into_fields_and_writes_the_same_bytes(tmp_path):
    manifest = ManifestV1.from_dict(json.loads(V1.read_text()), V1)
    assert manifest.version == 1 and manifest.created == "2026-12-01T09:06:44+00:00"
    assert manifest.reference.mode == "policy" and manifest.reference.precision == {
        "quantization": "nf4",
        "dtype": "float32",
    }
    assert manifest.identity.model.weights_sha256.startswith("27c4769e")
    assert manifest.identity.tokenization["max_length"] == 64
    assert manifest.pairs == {"train": 48, "eval": 48}
    assert manifest.data["eval"].kept == 48 and manifest.data["train"].source == "data/train.jsonl"
    assert len(manifest.shards) == 6
    assert manifest.shards[3] == ShardEntry(
        "shard-00003.safetensors",
        "eval",
        16,
        "076c3d661036db61d78ab2fb58e25b3d060be68739ff7cfb4c083f2f66e5d5f8",
    )
    assert manifest.seconds == 0.05 and manifest.versions["torch"] == "2.13.0+cpu"

    manifest.write(tmp_path / "again")
    assert (tmp_path / "again" / "manifest.json").read_bytes() == V1.read_bytes()
    assert ManifestV1.from_dict(manifest.to_dict(), V1) == manifest


def test_v1_manifest_reads_as_the_v2_manifest_it_amounts_to(tmp_path):
    """Train, eval, info and verify read a v1 cache through Manifest: one data set per split,
    the same shards, its one build as the history; written, it is a v2 manifest."""
    old = ManifestV1.from_dict(json.loads(V1.read_text()), V1)
    manifest = Manifest.read(cache_with(tmp_path, V1.read_text()))
    assert manifest.version == 1 and manifest.created == old.created
    assert manifest.identity == old.identity and manifest.reference == old.reference
    assert manifest.shards == old.shards and manifest.pairs == old.pairs == {"train": 48, "eval": 48}
    assert [(d.split, d.report) for d in manifest.datasets] == list(old.data.items())
    assert [(c.added, c.scored, c.seconds, c.versions) for c in manifest.history] == [
        (96, 96, 0.05, old.versions)
    ]

    manifest.write(tmp_path / "v2")
    written = json.loads((tmp_path / "v2" / "manifest.json").read_text())
    assert written["version"] == 2 and written["pairs"] == {"train": 48, "eval": 48}
    assert [s["fields"] for s in written["shards"]] == [list(SHARD_KEYS)] * 6
    again = Manifest.read(tmp_path / "v2")
    assert again.version == 2
    assert (again.identity, again.reference, again.datasets, again.shards, again.history) == (
        manifest.identity,
        manifest.reference,
        manifest.datasets,
        manifest.shards,
        manifest.history,
    )


def damaged(edit) -> str:
    raw = json.loads(V1.read_text())
    edit(raw)
    return json.dumps(raw, indent=2)


DAMAGE = {
    "version": (
        damaged(lambda m: m.update(version=3)),
        "format version 3, this lora-dpo reads versions 1 and 2",
    ),
    "not-json": (V1.read_text()[:200], "not valid JSON (Unterminated string"),
    "other-format": (
        damaged(lambda m: m.update(format="something-else")),
        "not a lora-dpo-reference-cache manifest",
    ),
    "missing-field": (
        damaged(lambda m: m["identity"]["model"].pop("weights_sha256")),
        "field identity.model.weights_sha256 is missing",
    ),
    "missing-section": (damaged(lambda m: m.pop("shards")), "field shards is missing"),
    "wrong-type": (
        damaged(lambda m: m["shards"][1].update(pairs="16")),
        "field shards[1].pairs is str, expected int",
    ),
    "not-null": (
        damaged(lambda m: m["identity"]["model"].update(config_sha256=3)),
        "field identity.model.config_sha256 is int, expected str or null",
    ),
    "data-report": (
        damaged(lambda m: m["data"]["eval"].pop("source")),
        "field data.eval is not a data report (",
    ),
}


@pytest.mark.parametrize("name", DAMAGE)
def test_damaged_manifest_is_a_one_line_error_naming_file_and_field(tmp_path, name):
    text, problem = DAMAGE[name]
    cache_dir = cache_with(tmp_path, text)
    with pytest.raises(CacheError) as caught:
        Manifest.read(cache_dir)
    message = str(caught.value)
    assert message.startswith(f"{cache_dir / 'manifest.json'}: {problem}")
    assert "\n" not in message
    with pytest.raises(CacheError, match="^" + str(cache_dir / "manifest.json")):
        ReferenceCache(cache_dir)  # training and eval open the cache through it


def test_missing_manifest_says_the_cache_is_incomplete(tmp_path):
    with pytest.raises(
        CacheError, match=r"no manifest.json; not a reference cache, or its precompute did not finish"
    ):
        Manifest.read(tmp_path)


def test_report_shows_a_manifest_or_says_why_it_cannot(tmp_path):
    cache_dir = cache_with(tmp_path, V1.read_text())
    shown = "\n".join(_cache_lines({"precompute": {"cache_dir": str(cache_dir)}}))
    assert "| reference | policy (nf4, float32) |" in shown
    assert "| pairs | train 48, eval 48 |" in shown
    assert "max_length 64, max_prompt_length 32" in shown
    assert "| tokenizer sha256 | f72d51852391f3ea2584addaca7e92db2c0e10f52aef6cf778771b4630c39370 |" in shown

    (cache_dir / "manifest.json").write_text(DAMAGE["version"][0])
    shown = _cache_lines({"precompute": {"cache_dir": str(cache_dir)}})
    assert f"The manifest cannot be read: {cache_dir / 'manifest.json'}: format version 3" in shown[2]
    shutil.rmtree(cache_dir)
    assert "No manifest at" in _cache_lines({"precompute": {"cache_dir": str(cache_dir)}})[2]


# Written by a format v2 build of the same demo cache (48 + 48 pairs, shard_size 16).
V2 = Path(__file__).with_name("manifest_v2.json")


def test_v2_manifest_reads_into_fields_and_writes_the_same_bytes(tmp_path):
    manifest = Manifest.read(cache_with(tmp_path, V2.read_text()))
    assert manifest.version == 2 and manifest.created == "2026-12-01T09:49:05+00:00"
    assert manifest.reference.precision == {"quantization": "nf4", "dtype": "float32"}
    assert manifest.pairs == {"train": 48, "eval": 48} and manifest.total_pairs == 96
    assert [(d.split, d.report.source, d.pairs) for d in manifest.datasets] == [
        ("train", "data/train.jsonl", 48),
        ("eval", "data/eval.jsonl", 48),
    ]
    assert manifest.shards[3] == ShardEntry(
        "shard-00003.safetensors",
        "eval",
        16,
        "70056549b29389316e5d3edde7215942aa8cc147684b74e97e36e63963f7edf2",
        SHARD_KEYS,
    )
    assert [(c.what, c.added, c.scored, c.versions["torch"]) for c in manifest.history] == [
        ("precompute-ref", 96, 96, "2.13.0+cpu")
    ]
    manifest.write(tmp_path / "again")
    assert (tmp_path / "again" / "manifest.json").read_bytes() == V2.read_bytes()


def damaged_v2(edit) -> str:
    raw = json.loads(V2.read_text())
    edit(raw)
    return json.dumps(raw, indent=2)


def shard_file(name: str):
    return lambda m: m["shards"][0].update(file=name)


DAMAGE_V2 = {
    "parent-path": (
        damaged_v2(shard_file("../../x")),
        "field shards[0].file is '../../x', not a shard file name inside the cache (shard-<hex>.safetensors)",
    ),
    "absolute-path": (
        damaged_v2(shard_file("/tmp/shard-00000.safetensors")),
        "field shards[0].file is '/tmp/shard-00000.safetensors', not a shard file name inside the cache",
    ),
    "subdirectory": (
        damaged_v2(shard_file("sub/shard-00000.safetensors")),
        "field shards[0].file is 'sub/shard-00000",
    ),
    "other-name": (
        damaged_v2(shard_file("config.yaml")),
        "field shards[0].file is 'config.yaml', not a shard file name",
    ),
    "twice": (
        damaged_v2(lambda m: m["shards"][1].update(file="shard-00000.safetensors")),
        "field shards lists shard-00000.safetensors twice",
    ),
    "pairs": (
        damaged_v2(lambda m: m["pairs"].update(train=47)),
        "field pairs says {'train': 47, 'eval': 48}, the shards listed hold {'train': 48, 'eval': 48}",
    ),
    "fields-lack": (
        damaged_v2(lambda m: m["shards"][2]["fields"].remove("source_index")),
        "field shards[2].fields lacks source_index",
    ),
    "fields-name": (
        damaged_v2(lambda m: m["shards"][2]["fields"].append("../x")),
        "field shards[2].fields names '../x'",
    ),
    "history": (damaged_v2(lambda m: m.update(history=[])), "field history is empty"),
    "dataset": (damaged_v2(lambda m: m["datasets"][1].pop("report")), "field datasets[1].report is missing"),
    "version": (
        damaged_v2(lambda m: m.update(version=3)),
        "format version 3, this lora-dpo reads versions 1 and 2",
    ),
    "not-json": (V2.read_text()[:300], "not valid JSON ("),
}


@pytest.mark.parametrize("name", DAMAGE_V2)
def test_damaged_v2_manifest_is_a_one_line_error_naming_file_and_field(tmp_path, name):
    text, problem = DAMAGE_V2[name]
    cache_dir = cache_with(tmp_path, text)
    with pytest.raises(CacheError) as caught:
        ReferenceCache(cache_dir)
    message = str(caught.value)
    assert message.startswith(f"{cache_dir / 'manifest.json'}: {problem}")
    assert "\n" not in message
