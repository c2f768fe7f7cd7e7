"""The reference cache as a verified artifact: identity checks name the cause, subsets hit,
interrupted builds resume to identical bytes, corruption is named, sweeps never run the reference."""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from cache_edit import edited_cache_copy
from lora_dpo.cache import ReferenceCache, verify_cache, weights_fingerprint
from lora_dpo.cli import main as cli_main
from lora_dpo.config import dump_config
from lora_dpo.demo import demo_config
from lora_dpo.errors import CacheError
from lora_dpo.fileio import write_json
from lora_dpo.inputs import load_run_inputs
from lora_dpo.train import train
from precompute import precompute_reference


@pytest.fixture(scope="module")
def workdir(demo_workdir, tmp_path_factory):
    """A private copy of the demo fixture with a cache over 48 train and 48 eval pairs."""
    root = tmp_path_factory.mktemp("cache-tests")
    for part in ("model", "data"):
        shutil.copytree(demo_workdir / part, root / part)
    precompute_reference(base_config(root))
    return root


def base_config(root: Path, **data):
    config = demo_config(root)
    config.data.max_pairs = 48
    config.precompute.cache_dir = str(root / "cache")
    config.train.output_dir = str(root / "run")
    config.train.max_steps = 2
    for key, value in data.items():
        setattr(config.data, key, value)
    return config


def variant_model(workdir: Path, tmp_path: Path) -> Path:
    model = tmp_path / "model"
    shutil.copytree(workdir / "model", model)
    return model


def test_changed_weights_are_named(workdir, tmp_path):
    model = variant_model(workdir, tmp_path)
    weights = model / "model.safetensors"
    tensors = load_file(str(weights))
    name = sorted(tensors)[0]
    tensors[name][0, 0] += 1e-3  # one weight, barely changed
    save_file(tensors, str(weights), metadata={"format": "pt"})
    config = base_config(workdir)
    config.model.name_or_path = str(model)
    with pytest.raises(CacheError, match=r"model.weights_sha256: cache was built with"):
        load_run_inputs(config)


def test_changed_tokenizer_is_named(workdir, tmp_path):
    from transformers import AutoTokenizer

    model = variant_model(workdir, tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(str(model))
    tokenizer.add_tokens(["<extra>"])
    tokenizer.save_pretrained(str(model))
    config = base_config(workdir)
    config.model.name_or_path = str(model)
    with pytest.raises(CacheError, match=r"tokenization.tokenizer_sha256: cache was built with"):
        load_run_inputs(config)


def test_changed_chat_template_is_named(workdir, tmp_path):
    from transformers import AutoTokenizer

    model = variant_model(workdir, tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(str(model))
    tokenizer.chat_template = tokenizer.chat_template.replace("<|", "[").replace("|>", "]")
    tokenizer.save_pretrained(str(model))
    config = base_config(workdir)
    config.model.name_or_path = str(model)
    with pytest.raises(CacheError, match=r"tokenization.chat_template_sha256: cache was built with"):
        load_run_inputs(config)


def test_changed_max_length_is_named(workdir):
    config = base_config(workdir, max_length=128)
    with pytest.raises(
        CacheError, match=r"tokenization.max_length: cache was built with 64, this run uses 128"
    ):
        load_run_inputs(config)


def test_changed_data_is_named(workdir, tmp_path):
    rows = [json.loads(line) for line in (workdir / "data" / "train.jsonl").read_text().splitlines()]
    rows[3]["chosen"] = rows[3]["chosen"].replace(".", "!")
    changed = tmp_path / "train.jsonl"
    changed.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = base_config(workdir, train_path=str(changed))
    with pytest.raises(
        CacheError, match=r"1 of 48 train pairs are not in the reference cache \(source rows \[3\]"
    ):
        load_run_inputs(config)


def test_shuffled_subset_hits_the_cache(workdir, tmp_path):
    rows = (workdir / "data" / "train.jsonl").read_text().splitlines()[:48]
    random.Random(1).shuffle(rows)
    subset = tmp_path / "subset.jsonl"
    subset.write_text("\n".join(rows[:20]) + "\n")
    inputs = load_run_inputs(base_config(workdir, train_path=str(subset)))
    assert len(inputs.pairs) == 20


def test_aligned_values_follow_the_run_order(workdir, tmp_path):
    """Training indexes reference values by pair index: row i must be pairs[i]'s, whatever the order."""
    rows = (workdir / "data" / "train.jsonl").read_text().splitlines()[:48]
    random.Random(2).shuffle(rows)
    shuffled = tmp_path / "shuffled.jsonl"
    shuffled.write_text("\n".join(rows[:30]) + "\n")
    inputs = load_run_inputs(base_config(workdir, train_path=str(shuffled)))
    pairs, values = inputs.pairs, inputs.reference
    assert len(values) == len(pairs) == 30
    cache = inputs.cache
    rows = [cache.row_of[p.pair_hash] for p in pairs]  # by content hash, the oracle
    chosen, rejected = cache.chosen_logps[rows], cache.rejected_logps[rows]
    assert torch.equal(values.chosen_logps, chosen) and torch.equal(values.rejected_logps, rejected)
    assert values.chosen_tokens.tolist() == [len(p.chosen_ids) for p in pairs]
    assert values.rejected_tokens.tolist() == [len(p.rejected_ids) for p in pairs]
    some = [29, 3, 3, 11]
    assert torch.equal(
        values.logps(some)[0], cache.chosen_logps[[cache.row_of[pairs[i].pair_hash] for i in some]]
    )
    assert len(inputs.eval_reference) == len(inputs.eval_pairs) == 48


def test_deliberate_mismatch_can_be_accepted(workdir):
    config = base_config(workdir, max_length=128)
    config.train.accept_cache_mismatch = True
    load_run_inputs(config)


def test_step0_check_catches_values_from_another_model(workdir, tmp_path):
    """Fingerprints all match, but the stored values are not this model's: training stops."""

    def two_nats_per_token_off(tensors):
        tensors["chosen_logps"] -= 2.0 * tensors["chosen_tokens"]

    cache_dir = edited_cache_copy(workdir / "cache", tmp_path / "cache", two_nats_per_token_off)
    config = base_config(workdir)
    config.precompute.cache_dir = str(cache_dir)
    config.train.output_dir = str(tmp_path / "run")
    with pytest.raises(
        CacheError, match=r"policy at init disagrees with the cached reference by 2 nats per token"
    ):
        train(config)


def test_flipped_byte_fails_verify_and_train(workdir, tmp_path, capsys):
    cache_dir = tmp_path / "cache"
    shutil.copytree(workdir / "cache", cache_dir)
    shard = cache_dir / "shard-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0x01
    shard.write_bytes(bytes(data))

    assert cli_main(["cache", "verify", str(cache_dir)]) == 1
    assert "shard-00001.safetensors: checksum mismatch" in capsys.readouterr().err
    config = base_config(workdir)
    config.precompute.cache_dir = str(cache_dir)
    config.train.output_dir = str(tmp_path / "run")
    with pytest.raises(CacheError, match=r"shard-00001.safetensors: checksum mismatch"):
        train(config)
    assert cli_main(["cache", "verify", str(workdir / "cache")]) == 0
    assert "is sound (96 pairs)" in capsys.readouterr().out


def bad_values(name: str):
    """(an edit of a shard's tensors, the problem it must be refused with)."""

    def nan(tensors):
        tensors["chosen_logps"][:3] = math.nan

    def minus_inf(tensors):
        tensors["rejected_logps"][1:3] = -math.inf

    def positive(tensors):
        tensors["chosen_logps"][:4] = 0.5

    def no_tokens(tensors):
        tensors["rejected_tokens"][:1] = 0

    return {
        "nan": (nan, "chosen_logps holds 3 non-finite values"),
        "-inf": (minus_inf, "rejected_logps holds 2 non-finite values"),
        "positive": (positive, "chosen_logps holds 4 positive log-probs"),
        "no-tokens": (no_tokens, "rejected_tokens holds 1 counts <= 0"),
    }[name]


@pytest.mark.parametrize("name", ["nan", "-inf", "positive", "no-tokens"])
def test_bad_cached_values_stop_train_before_any_step(workdir, tmp_path, capsys, name):
    """Values the checksums cannot see are refused when the cache is opened, in one line naming
    the shard, not discovered later as skipped steps (or never, for a positive log-prob)."""
    edit, problem = bad_values(name)
    shard = "shard-00001.safetensors"
    cache_dir = edited_cache_copy(workdir / "cache", tmp_path / "cache", edit, only={shard})
    config = base_config(workdir)
    config.precompute.cache_dir = str(cache_dir)
    config.train.output_dir = str(tmp_path / "run")
    config_file = tmp_path / "config.yaml"
    config_file.write_text(dump_config(config))

    assert cli_main(["train", "--config", str(config_file)]) == 2
    expected = (
        f"error: {cache_dir / shard}: {problem}; rebuild the cache with precompute-ref --rebuild "
        "(lora-dpo cache verify lists every problem)"
    )
    assert capsys.readouterr().err.splitlines()[-1] == expected
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # no training step ran
    with pytest.raises(CacheError, match=re.escape(f"{cache_dir / shard}: {problem};")):
        ReferenceCache(cache_dir)


def test_verify_lists_every_bad_value(workdir, tmp_path, capsys):
    def two_problems(tensors):
        bad_values("positive")[0](tensors)  # the first four values
        bad_values("nan")[0](tensors)  # the first three of them

    edited = {"shard-00000.safetensors", "shard-00001.safetensors"}
    cache_dir = edited_cache_copy(workdir / "cache", tmp_path / "cache", two_problems, only=edited)
    problems, pairs = verify_cache(cache_dir)
    assert pairs == 96
    assert problems == [
        f"{cache_dir / shard}: {problem}"
        for shard in sorted(edited)
        for problem in ("chosen_logps holds 3 non-finite values", "chosen_logps holds 1 positive log-probs")
    ]
    assert cli_main(["cache", "verify", str(cache_dir)]) == 1
    assert "cache verify: 4 problem(s)" in capsys.readouterr().err


def test_cache_info_describes_the_cache(workdir, capsys):
    assert cli_main(["cache", "info", str(workdir / "cache")]) == 0
    out = capsys.readouterr().out
    for text in (
        "pairs: train 48, eval 48",
        "reference: policy (nf4, float32)",
        "max_length 64",
        "chosen logps: mean",
    ):
        assert text in out


SLOW_PRECOMPUTE = """
import sys, time
import lora_dpo.cache.build as build
from lora_dpo.config import load_config

real_write = build.write_shard
def slow_write(*args, **kwargs):  # slow enough that the kill lands between shards
    checksum = real_write(*args, **kwargs)
    time.sleep(0.4)
    return checksum
build.write_shard = slow_write
build.build_cache(load_config(sys.argv[1]))
"""


def test_killed_precompute_resumes_to_identical_shards(workdir, tmp_path):
    def config_for(cache_dir: Path):
        config = base_config(workdir)
        config.precompute.cache_dir = str(cache_dir)
        config.precompute.shard_size = 8
        config.precompute.batch_size = 8
        return config

    precompute_reference(config_for(tmp_path / "whole"))

    interrupted = config_for(tmp_path / "resumed")
    config_file = tmp_path / "config.yaml"
    config_file.write_text(dump_config(interrupted))
    process = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(SLOW_PRECOMPUTE), str(config_file)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while len(list((tmp_path / "resumed").glob("shard-*.safetensors"))) < 3:
        assert process.poll() is None, "precompute ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    written = sorted(p.name for p in (tmp_path / "resumed").glob("shard-*.safetensors"))
    assert not (tmp_path / "resumed" / "manifest.json").exists()
    assert 3 <= len(written) < 12

    precompute_reference(interrupted)
    whole = json.loads((tmp_path / "whole" / "manifest.json").read_text())
    resumed = json.loads((tmp_path / "resumed" / "manifest.json").read_text())
    assert [s["file"] for s in whole["shards"]] == [s["file"] for s in resumed["shards"]]
    for entry in whole["shards"]:
        a = load_file(str(tmp_path / "whole" / entry["file"]))
        b = load_file(str(tmp_path / "resumed" / entry["file"]))
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), (entry["file"], key)
    assert [s["sha256"] for s in whole["shards"]] == [s["sha256"] for s in resumed["shards"]]
    for key in ("identity", "reference", "datasets", "pairs"):
        assert whole[key] == resumed[key]


def test_weight_fingerprint_is_memoised_and_tracks_changes(workdir, tmp_path):
    model = variant_model(workdir, tmp_path)
    config = base_config(workdir)
    config.model.name_or_path = str(model)
    first = weights_fingerprint(config.model)
    memo = Path(os.environ["LORA_DPO_CACHE_HOME"]) / "weight-fingerprints.json"
    entries = json.loads(memo.read_text())
    assert any(str((model / "model.safetensors").resolve()) in key for key in entries)
    assert weights_fingerprint(config.model) == first
    tensors = load_file(str(model / "model.safetensors"))
    name = sorted(tensors)[-1]
    tensors[name].view(-1)[0] += 1.0
    save_file(tensors, str(model / "model.safetensors"), metadata={"format": "pt"})
    assert weights_fingerprint(config.model) != first


def test_sweep_never_runs_the_reference(workdir, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    import lora_dpo.cache.build as build
    import lora_dpo.sweep as sweep

    reference_runs, model_loads = [], []
    real_score = build.score_pairs
    monkeypatch.setattr(build, "score_pairs", lambda *a, **k: reference_runs.append(1) or real_score(*a, **k))
    real_load = AutoModelForCausalLM.from_pretrained.__func__
    monkeypatch.setattr(
        AutoModelForCausalLM,
        "from_pretrained",
        classmethod(lambda cls, *a, **k: model_loads.append(1) or real_load(cls, *a, **k)),
    )
    before = {p.name: p.read_bytes() for p in (workdir / "cache").iterdir()}
    config = base_config(workdir)
    config.train.output_dir = str(tmp_path / "sweep")
    result = sweep.run_sweep(config, [0.05, 0.1, 0.5])

    assert reference_runs == []
    assert len(model_loads) == 1  # the 4-bit base, once for all three runs
    assert {p.name: p.read_bytes() for p in (workdir / "cache").iterdir()} == before
    assert [row["beta"] for row in result.rows] == [0.05, 0.1, 0.5]
    assert result.table_md.read_text().count("\n") == 5
    assert json.loads(result.table_json.read_text())["runs"][1]["beta"] == 0.1
    assert result.plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # A run inside the sweep equals a standalone run with the same beta.
    config.train.beta = 0.1
    config.train.output_dir = str(tmp_path / "alone")
    alone = train(config)
    swept = [
        json.loads(line)
        for line in (tmp_path / "sweep" / "beta-0.1" / "metrics.jsonl").read_text().splitlines()
    ]
    assert [r["loss"] for r in swept if "loss" in r] == [r["loss"] for r in alone.history]


def test_atomic_writes_get_ordinary_permissions(tmp_path):
    path = tmp_path / "x.json"
    write_json(path, {"a": 1})
    mask = os.umask(0)
    os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask
