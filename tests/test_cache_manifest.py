"""manifest.json as a typed Manifest: a format v1 file reads back to the same bytes, and a damaged
one is a one-line CacheError naming the file and the field."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from lora_dpo.cache import Manifest, ReferenceCache, ShardEntry
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
    manifest = Manifest.read(cache_with(tmp_path, V1.read_text()))
    assert manifest.version == 1 and manifest.created == "2026-12-01T09:06:44+00:00"
    assert manifest.reference.mode == "policy" and manifest.reference.precision == {"quantization": "nf4", "dtype": "float32"}
    assert manifest.identity.model.weights_sha256.startswith("27c4769e")
    assert manifest.identity.tokenization["max_length"] == 64
    assert manifest.pairs == {"train": 48, "eval": 48}
    assert manifest.data["eval"].kept == 48 and manifest.data["train"].source == "data/train.jsonl"
    assert len(manifest.shards) == 6
    assert manifest.shards[3] == ShardEntry(
        "shard-00003.safetensors", "eval", 16, "076c3d661036db61d78ab2fb58e25b3d060be68739ff7cfb4c083f2f66e5d5f8"
    )
    assert manifest.seconds == 0.05 and manifest.versions["torch"] == "2.13.0+cpu"

    manifest.write(tmp_path / "again")
    assert (tmp_path / "again" / "manifest.json").read_bytes() == V1.read_bytes()
    assert Manifest.from_dict(manifest.to_dict(), V1) == manifest


def damaged(edit) -> str:
    raw = json.loads(V1.read_text())
    edit(raw)
    return json.dumps(raw, indent=2)


DAMAGE = {
    "version": (
        damaged(lambda m: m.update(version=2)),
        "format version 2, this lora-dpo reads version 1",
    ),
    "not-json": (V1.read_text()[:200], "not valid JSON (Unterminated string"),
    "other-format": (damaged(lambda m: m.update(format="something-else")), "not a lora-dpo-reference-cache manifest"),
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
    with pytest.raises(CacheError, match=r"no manifest.json; not a reference cache, or its precompute did not finish"):
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
    assert f"The manifest cannot be read: {cache_dir / 'manifest.json'}: format version 2" in shown[2]
    shutil.rmtree(cache_dir)
    assert "No manifest at" in _cache_lines({"precompute": {"cache_dir": str(cache_dir)}})[2]
