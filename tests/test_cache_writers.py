"""Writers never destroy a valid cache: one at a time (flock on <cache>/.lock; the second waits,
or with --no-wait fails naming the holder's pid), a killed rebuild leaves the old cache usable
and resumable, and every file gets the permissions open() would give."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from cache_edit import counted_pairs, write_rows
from lora_dpo.cache import (
    Manifest,
    ReferenceCache,
    build_cache,
    export_cache,
    import_cache,
    verify_cache,
    writer_lock,
)
from lora_dpo.cli import main as cli_main
from lora_dpo.config import dump_config
from lora_dpo.data import load_preference_data
from lora_dpo.demo import demo_config
from lora_dpo.lockfile import describe_holder, read_holder
from lora_dpo.model import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def workdir(demo_workdir, tmp_path_factory):
    root = tmp_path_factory.mktemp("writers")
    for part in ("model", "data"):
        shutil.copytree(demo_workdir / part, root / part)
    rows = (root / "data" / "train.jsonl").read_text().splitlines()
    write_rows(root / "old.jsonl", rows[:40])
    write_rows(root / "new.jsonl", rows[40:80])
    return root


def config_for(root: Path, cache_dir: Path, data: str = "old.jsonl"):
    config = demo_config(root)
    config.data.train_path = str(root / data)
    config.data.eval_path = None
    config.train.generate_every = 0  # samples need held-out prompts
    config.precompute.cache_dir = str(cache_dir)
    config.train.layout = (
        "padded"  # counted_pairs counts padded batches; the cache is the same in every layout
    )
    config.precompute.shard_size = 8
    config.precompute.batch_size = 4
    return config


def config_file(config, path: Path) -> Path:
    path.write_text(dump_config(config))
    return path


def precompute(config_path: Path, *flags: str, stderr=subprocess.PIPE) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "precompute", "--quiet", "--config", str(config_path), *flags],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=stderr,
        text=True,
    )


def wait_for(condition, what: str, process: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, f"the process ended before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.mark.slow
def test_a_second_writer_waits_or_fails_at_once_naming_the_holder(workdir, tmp_path):
    cache_dir = tmp_path / "cache"
    path = config_file(config_for(workdir, cache_dir), tmp_path / "config.yaml")
    with writer_lock(cache_dir):
        refused = precompute(path, "--no-wait")
        _, err = refused.communicate(timeout=180)
        assert refused.returncode == 2
        holder = describe_holder(read_holder(cache_dir / ".lock"))
        assert holder.startswith(f"pid {os.getpid()} on ")
        assert err.strip().splitlines()[-1] == (
            f"error: {cache_dir}: another process ({holder}) is writing this reference cache; "
            "run again when it is done, or without --no-wait to wait for it"
        )
        log = tmp_path / "waiting.log"
        with log.open("w") as stderr:
            waiting = precompute(path, stderr=stderr)
            wait_for(
                lambda: f"waiting for pid {os.getpid()}" in log.read_text(), "the waiting message", waiting
            )
            time.sleep(0.5)
            assert waiting.poll() is None and not (cache_dir / "manifest.json").exists()
    assert waiting.wait(timeout=180) == 0
    assert verify_cache(cache_dir) == ([], 40)


@pytest.mark.slow
def test_two_concurrent_precomputes_on_one_cache(workdir, tmp_path):
    """Started together: one scores, the other waits for it and finds nothing left to score."""
    cache_dir = tmp_path / "cache"
    path = config_file(config_for(workdir, cache_dir), tmp_path / "config.yaml")
    processes = [precompute(path), precompute(path)]
    errs = [process.communicate(timeout=300)[1] for process in processes]
    assert [process.returncode for process in processes] == [0, 0], errs
    scored = ["40 new pairs scored" in err for err in errs]
    covered = ["already covers this data: nothing to score" in err for err in errs]
    assert sorted(scored) == [False, True] and covered == [not s for s in scored]
    assert verify_cache(cache_dir) == ([], 40)
    assert len(Manifest.read(cache_dir).history) == 1


SLOW_PRECOMPUTE = """
import sys, time
from torch.nn.modules.module import register_module_forward_hook
from lora_dpo.cli import main

# Slow enough that the kill lands between shards: every decoder forward takes 0.3 s more.
register_module_forward_hook(
    lambda module, args, output: time.sleep(0.3) if type(module).__name__ == "LlamaModel" else None
)
sys.exit(main(["precompute-ref", *sys.argv[1:]]))
"""


@pytest.mark.slow
def test_a_killed_rebuild_leaves_the_old_cache_usable_and_resumes(workdir, tmp_path):
    cache_dir = tmp_path / "cache"
    old = config_for(workdir, cache_dir, "old.jsonl")
    build_cache(old)
    old_manifest = (cache_dir / "manifest.json").read_bytes()
    old_shards = {p.name: p.read_bytes() for p in cache_dir.glob("shard-*.safetensors")}
    assert sorted(old_shards) == [f"shard-0000{i}.safetensors" for i in range(5)]

    new = config_for(workdir, cache_dir, "new.jsonl")
    process = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(SLOW_PRECOMPUTE),
            "--rebuild",
            "--quiet",
            "--config",
            str(config_file(new, tmp_path / "new.yaml")),
        ],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    written = lambda: sorted(set(p.name for p in cache_dir.glob("shard-*.safetensors")) - set(old_shards))  # noqa: E731
    wait_for(lambda: len(written()) >= 2, "two new shards", process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    partial = written()
    assert 2 <= len(partial) < 5 and partial[0] == "shard-00005.safetensors"

    # The old cache is as it was, and usable: it opens, verifies, and trains on its data.
    assert (cache_dir / "manifest.json").read_bytes() == old_manifest
    assert {name: (cache_dir / name).read_bytes() for name in old_shards} == old_shards
    assert verify_cache(cache_dir) == ([], 40)
    assert cli_main(["cache", "verify", str(cache_dir)]) == 0
    pairs = load_preference_data(old.data, load_tokenizer(old.model), "train")[0]
    assert len(ReferenceCache(cache_dir).aligned(pairs, "train")) == 40

    # Re-running the rebuild reuses the shards the killed run completed, then replaces the cache.
    with counted_pairs() as scored:
        build_cache(new, rebuild=True)
    assert sum(scored) == 40 - 8 * len(partial)
    assert verify_cache(cache_dir) == ([], 40)
    assert not set(old_shards) & {p.name for p in cache_dir.glob("shard-*.safetensors")}
    fresh_dir = tmp_path / "fresh"
    build_cache(config_for(workdir, fresh_dir, "new.jsonl"))
    resumed, fresh = ReferenceCache(cache_dir), ReferenceCache(fresh_dir)
    assert resumed.pair_hashes == fresh.pair_hashes
    assert torch.equal(resumed.chosen_logps, fresh.chosen_logps)
    assert torch.equal(resumed.rejected_logps, fresh.rejected_logps)


@pytest.mark.parametrize("umask", [0o027, 0o002])
def test_cache_files_get_the_permissions_open_would_give(workdir, tmp_path, umask):
    previous = os.umask(umask)
    try:
        cache_dir = tmp_path / "cache"
        build_cache(config_for(workdir, cache_dir))
        build_cache(config_for(workdir, cache_dir, "new.jsonl"))  # an incremental write too
        export_cache(cache_dir, tmp_path / "ref.parquet")
        import_cache(tmp_path / "ref.parquet", tmp_path / "imported")
        assert cli_main(["cache", "info", str(cache_dir), "--plot"]) == 0
    finally:
        os.umask(previous)
    files = [*cache_dir.iterdir(), *(tmp_path / "imported").iterdir(), tmp_path / "ref.parquet"]
    names = sorted(str(path.relative_to(tmp_path)) for path in files)
    assert len(names) == (10 + 4) + (10 + 2) + 1, (
        names
    )  # shards, manifest, config, lock, plot; the import; the table
    for path in files:
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask, path
    for directory in (cache_dir, tmp_path / "imported"):
        assert directory.stat().st_mode & 0o777 == 0o777 & ~umask, directory
