"""A hostile or damaged cache fails safely: a manifest naming files outside the cache is refused
before anything is opened, hashed or removed (the decoys survive a rebuild, a verify and the
stale-shard cleanup); a shard inconsistent with its manifest, or with wrong shapes, is named;
extra per-pair fields are allowed, listed, and ignored by readers."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch

from cache_edit import edited_cache_copy
from lora_dpo.cache import (
    Manifest,
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
from lora_dpo.fileio import sha256_file


def config_for(root: Path, cache_dir: Path):
    config = demo_config(root)
    config.data.max_pairs = 20
    config.data.eval_path = None
    config.precompute.cache_dir = str(cache_dir)
    config.precompute.shard_size = 8
    return config


@pytest.fixture(scope="module")
def built(demo_workdir, tmp_path_factory):
    """A sound cache of 20 pairs in 3 shards."""
    root = tmp_path_factory.mktemp("hostile")
    for part in ("model", "data"):
        shutil.copytree(demo_workdir / part, root / part)
    build_cache(config_for(root, root / "cache"))
    return root


def hostile(built: Path, tmp_path: Path, name_of) -> tuple[Path, dict[Path, bytes]]:
    """A copy of the cache whose manifest lists, as shard 0, `name_of(decoy outside the cache)`,
    with that decoy's true checksum: a reader that followed the name would find a good shard."""
    cache_dir = tmp_path / "a" / "cache"
    shutil.copytree(built / "cache", cache_dir)
    outside = tmp_path / "x"
    absolute = tmp_path / "elsewhere" / "shard-00000.safetensors"
    absolute.parent.mkdir()
    for decoy in (outside, absolute):
        shutil.copyfile(cache_dir / "shard-00000.safetensors", decoy)
    inside = cache_dir / "notes.txt"  # not a shard name: no cleanup may touch it
    inside.write_text("mine")
    link = cache_dir / "shard-00099.safetensors"  # an unlisted shard name that links outside
    link.symlink_to(absolute)
    raw = json.loads((cache_dir / "manifest.json").read_text())
    raw["shards"][0]["file"] = name_of(outside, absolute)
    (cache_dir / "manifest.json").write_text(json.dumps(raw, indent=2))
    return cache_dir, {path: path.read_bytes() for path in (outside, absolute, inside)}


HOSTILE_NAMES = {
    "parent": (lambda outside, absolute: "../../x", "'../../x'"),
    "absolute": (lambda outside, absolute: str(absolute), "'/"),
}


@pytest.mark.parametrize("kind", HOSTILE_NAMES)
def test_a_manifest_naming_files_outside_the_cache_touches_none(built, tmp_path, capsys, kind):
    name_of, shown = HOSTILE_NAMES[kind]
    cache_dir, decoys = hostile(built, tmp_path, name_of)
    refusal = f"{cache_dir / 'manifest.json'}: field shards[0].file is {shown}"

    with pytest.raises(CacheError, match="^" + re.escape(refusal)):
        ReferenceCache(cache_dir)
    for argv in (
        ["cache", "verify", str(cache_dir)],
        ["cache", "info", str(cache_dir)],
        ["cache", "export", str(cache_dir), "--out", str(tmp_path / "t.parquet")],
    ):
        assert cli_main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"error: {refusal}") and "\n" not in err
    with pytest.raises(CacheError, match="^" + re.escape(refusal)):
        build_cache(config_for(built, cache_dir))  # incremental: the cache is refused, not replaced
    with pytest.raises(CacheError, match="^" + re.escape(refusal)):
        merge_caches([built / "cache"], cache_dir)
    with pytest.raises(CacheError, match="^" + re.escape(refusal)):
        merge_caches([cache_dir], tmp_path / "joined")
    assert (cache_dir / "shard-00099.safetensors").is_symlink()  # nothing cleaned up yet

    build_cache(config_for(built, cache_dir), rebuild=True)
    assert verify_cache(cache_dir) == ([], 20)
    assert not os.path.lexists(cache_dir / "shard-00099.safetensors")  # the link went, not its target
    assert sorted(p.name for p in cache_dir.glob("shard-*")) == [
        f"shard-0000{i}.safetensors" for i in range(3)
    ]
    for decoy, data in decoys.items():
        assert decoy.read_bytes() == data, decoy


def test_shards_inconsistent_with_the_manifest_are_named(built, tmp_path):
    def rewrite(cache_dir: Path, number: int, **changes) -> None:
        manifest = Manifest.read(cache_dir)
        shards = list(manifest.shards)
        shards[number] = dataclasses.replace(shards[number], **changes)
        dataclasses.replace(manifest, shards=tuple(shards)).write(cache_dir)

    count = tmp_path / "count"
    shutil.copytree(built / "cache", count)
    (count / "shard-00002.safetensors").unlink()
    shutil.copyfile(built / "cache" / "shard-00001.safetensors", count / "shard-00002.safetensors")
    rewrite(count, 2, sha256=sha256_file(count / "shard-00002.safetensors"))
    with pytest.raises(CacheError, match=r"shard-00002.safetensors: holds 8 pairs, manifest says 4$"):
        ReferenceCache(count)
    assert verify_cache(count)[0] == [f"{count / 'shard-00002.safetensors'}: holds 8 pairs, manifest says 4"]

    fields = tmp_path / "fields"
    shutil.copytree(built / "cache", fields)
    rewrite(fields, 1, fields=(*Manifest.read(fields).shards[1].fields, "first_token_logps"))
    with pytest.raises(
        CacheError,
        match=r"shard-00001.safetensors: holds fields pair_hash, .*, source_index; "
        r"the manifest lists .*source_index, first_token_logps$",
    ):
        ReferenceCache(fields)

    missing = tmp_path / "missing"
    shutil.copytree(built / "cache", missing)
    (missing / "shard-00000.safetensors").unlink()
    assert verify_cache(missing)[0] == [
        f"{missing / 'shard-00000.safetensors'}: shard listed in the manifest is missing"
    ]


@pytest.mark.parametrize(
    "edit, problem",
    [
        (
            lambda t: t.update(chosen_logps=t["chosen_logps"][:, None].clone()),
            "chosen_logps is float32 [8, 1], expected float32 [8]",
        ),
        (
            lambda t: t.update(pair_hash=t["pair_hash"][:, :31].clone()),
            "pair_hash is uint8 [8, 31], expected uint8 [8, 32]",
        ),
        (
            lambda t: t.update(rejected_tokens=t["rejected_tokens"].long()),
            "rejected_tokens is int64 [8], expected int32 [8]",
        ),
        (
            lambda t: t.update(source_index=t["source_index"][:5].clone()),
            "source_index is int64 [5], expected int64 [8]",
        ),
        (
            lambda t: t["rejected_logps"].__setitem__(2, float("inf")),
            "rejected_logps holds 1 non-finite values",
        ),
    ],
)
def test_verify_names_a_shard_with_wrong_shapes_or_values(built, tmp_path, capsys, edit, problem):
    shard = "shard-00001.safetensors"
    cache_dir = edited_cache_copy(built / "cache", tmp_path / "cache", edit, only={shard})
    problems, _ = verify_cache(cache_dir)
    assert problems == [f"{cache_dir / shard}: {problem}"]
    assert cli_main(["cache", "verify", str(cache_dir)]) == 1
    assert f"problem: {cache_dir / shard}: {problem}" in capsys.readouterr().err
    with pytest.raises(CacheError, match=re.escape(problem)):
        ReferenceCache(cache_dir)


def test_extra_fields_are_listed_ignored_by_readers_and_travel(built, tmp_path):
    """A shard may hold more per-pair tensors than the reader needs (listed as its `fields`)."""

    def add_first_tokens(tensors):
        tensors["first_token_logps"] = -torch.rand(len(tensors["pair_hash"]), 4)  # [n, k]

    cache_dir = edited_cache_copy(
        built / "cache", tmp_path / "cache", add_first_tokens, only={"shard-00001.safetensors"}
    )
    manifest = Manifest.read(cache_dir)
    shards = list(manifest.shards)
    shards[1] = dataclasses.replace(shards[1], fields=(*shards[1].fields, "first_token_logps"))
    dataclasses.replace(manifest, shards=tuple(shards)).write(cache_dir)

    cache, plain = ReferenceCache(cache_dir), ReferenceCache(built / "cache")
    assert torch.equal(cache.chosen_logps, plain.chosen_logps)
    assert verify_cache(cache_dir) == ([], 20)
    export_cache(cache_dir, tmp_path / "t.parquet")
    import_cache(tmp_path / "t.parquet", tmp_path / "back")
    assert Manifest.read(tmp_path / "back").shards == Manifest.read(cache_dir).shards
    for entry in manifest.shards:
        assert (tmp_path / "back" / entry.file).read_bytes() == (cache_dir / entry.file).read_bytes()
