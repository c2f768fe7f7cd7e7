"""Every verb, given broken arguments or damaged files, ends in one line on stderr, `error: ...`,
and exit code 2: never a traceback. argparse's own mistakes (a missing option, an unknown one,
a bad choice) are one line too: `error: <message> (see lora-dpo VERB --help)`.

The table runs the CLI in-process (`lora_dpo.cli.main`); a few rows run again as a user runs
them, in a fresh process (slow). A full disk while a verb writes its output is one line and
leaves the earlier state in place."""

from __future__ import annotations

import argparse
import errno
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import lora_dpo.fileio
from lora_dpo.arguments import build_parser
from lora_dpo.cli import main
from lora_dpo.config import dump_config, load_config
from lora_dpo.demo import demo_config
from precompute import precompute_reference

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def paths(demo_workdir, tmp_path_factory) -> dict[str, str]:
    """Broken inputs of every kind, and a sound config whose cache exists and a sound adapter
    (so that a row gets past the parts it does not break)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("verbs")
    config = demo_config(demo_workdir)
    config.data.max_pairs = 16
    config.precompute.cache_dir = str(root / "cache")
    config.train.output_dir = str(root / "train")
    (root / "config.yaml").write_text(dump_config(config))
    precompute_reference(config)
    model = AutoModelForCausalLM.from_pretrained(str(demo_workdir / "model"))
    get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"])).save_pretrained(str(root / "adapter"))

    (root / "a-file.txt").write_text("not a directory\n")
    (root / "a-directory").mkdir()
    (root / "binary.yaml").write_bytes(b"\xff\xfe\x00\x81\x89PNG binary\x00")
    (root / "binary.jsonl").write_bytes(b"\xff\xfe\x00\x81\x89PNG binary\x00\n\x93\x00")
    (root / "empty.yaml").write_text("")
    (root / "list.yaml").write_text("- train\n- beta\n")
    (root / "garbage-adapter").mkdir()
    (root / "garbage-adapter" / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 8')  # cut short
    (root / "garbage-adapter" / "adapter_model.safetensors").write_bytes(os.urandom(64))
    damaged_run = root / "damaged-run"
    damaged_run.mkdir()
    (damaged_run / "config.yaml").write_text(dump_config(config))
    (damaged_run / "metrics.jsonl").write_text(
        '[1, 2]\n{"step": "one", "loss": 0.6}\n{"step": 1, "loss": "0.6?"}\n"x"\n'
    )
    binary_run = root / "binary-run"
    binary_run.mkdir()
    (binary_run / "metrics.jsonl").write_bytes(bytes(range(256)).replace(b"\n", b"\x00") * 4)
    damaged_cache = Path(shutil.copytree(root / "cache", root / "damaged-cache"))
    (damaged_cache / "manifest.json").write_bytes((damaged_cache / "manifest.json").read_bytes()[:40])
    names = {
        "config": "config.yaml",
        "cache": "cache",
        "adapter": "adapter",
        "a_file": "a-file.txt",
        "a_directory": "a-directory",
        "binary": "binary.yaml",
        "binary_jsonl": "binary.jsonl",
        "empty": "empty.yaml",
        "list": "list.yaml",
        "garbage_adapter": "garbage-adapter",
        "damaged_run": "damaged-run",
        "binary_run": "binary-run",
        "damaged_cache": "damaged-cache",
    }
    found = {key: str(root / name) for key, name in names.items()}
    return {**found, "missing": str(root / "missing"), "out": str(root / "merged")}


# (args with {placeholders} for `paths`, what the one line says); rows are grouped by verb.
ROWS = [
    # precompute-ref
    ("precompute-ref --config {missing}", "config file not found: {missing}"),
    ("precompute-ref --config {a_directory}", "{a_directory}"),
    ("precompute-ref --config {binary}", "{binary}"),
    ("precompute-ref --config {empty}", "model.name_or_path is not set"),
    ("precompute-ref --config {list}", "{list}: expected a mapping of sections, got list"),
    ("precompute-ref train.beta", "override 'train.beta': expected key=value"),
    ("precompute-ref =1", "unknown key ''"),
    ("precompute-ref --bogus", "unrecognized arguments: --bogus (see lora-dpo precompute-ref --help)"),
    ("precompute-ref --config {config} data.train_path={missing}", "{missing}"),
    ("precompute-ref --config {config} data.train_path={a_directory}", "{a_directory}"),
    ("precompute-ref --config {config} precompute.cache_dir={a_file} --quiet", "{a_file}"),
    ("precompute-ref --rebuild=yes", "argument --rebuild: ignored explicit argument 'yes'"),
    # train
    ("train --resume {missing}", "{missing}"),
    ("train --resume {a_file}", "{a_file}"),
    ("train --resume", "argument --resume: expected one argument (see lora-dpo train --help)"),
    ("train --config {config} precompute.cache_dir={a_file}", "{a_file}: no manifest.json"),
    ("train --config {config} precompute.cache_dir={damaged_cache}", "{damaged_cache}"),
    ("train --config {config} train.output_dir={a_file} --quiet", "{a_file}"),
    ("train --config {binary}", "{binary}"),
    ("train --config {list}", "expected a mapping of sections"),
    ("train train.bta=1", "unknown key 'train.bta'"),
    ("train --bogus", "unrecognized arguments: --bogus (see lora-dpo train --help)"),
    # eval
    ("eval --adapter {missing} --config {config}", "--adapter {missing}: no such directory"),
    (
        "eval --adapter {garbage_adapter} --config {config}",
        "{garbage_adapter}/adapter_config.json: not valid JSON",
    ),
    ("eval --adapter {a_file} --config {config}", "--adapter {a_file}: a file, not an adapter directory"),
    ("eval --adapter {damaged_run} --config {config}", "a train run directory with no adapter_config.json"),
    ("eval --adapter {a_directory} --config {config}", "no adapter_config.json there or in"),
    ("eval --base", "argument --base: expected one argument (see lora-dpo eval --help)"),
    ("eval --config {config} precompute.cache_dir={a_file}", "{a_file}: no manifest.json"),
    ("eval --config {config} precompute.cache_dir={damaged_cache}", "{damaged_cache}"),
    ("eval --config {config} --base {missing}", "{missing}"),
    ("eval --config {binary}", "{binary}"),
    (
        "eval --adapter {adapter} --config {config} train.reward_model={missing}",
        "train.reward_model='{missing}': no such directory",
    ),
    # generate
    ("generate", "the following arguments are required: --adapter (see lora-dpo generate --help)"),
    ("generate --adapter {missing} --config {config}", "--adapter {missing}: no such directory"),
    (
        "generate --adapter {garbage_adapter} --config {config}",
        "{garbage_adapter}/adapter_config.json: not valid JSON",
    ),
    (
        "generate --adapter {damaged_run} --config {config}",
        "a train run directory with no adapter_config.json",
    ),
    (
        "generate --adapter {adapter} --config {config} --temperature 0.5",
        "--temperature: a sampling setting, and --sample is not given",
    ),
    ("generate --adapter {adapter} --config {config} --prompts 0", "--prompts 0: must be >= 1"),
    (
        "generate --adapter {adapter} --config {config} --max-new-tokens x",
        "argument --max-new-tokens: invalid int value: 'x'",
    ),
    ("generate --adapter {adapter} --config {config} data.eval_path={missing}", "{missing}"),
    ("generate --adapter {adapter} --config {binary}", "{binary}"),
    # sweep
    ("sweep", "sweep: nothing to vary; give --set train.KEY=V1,V2 (or --betas)"),
    (
        "sweep --set train.beta=0.1,x --config {config}",
        "sweep point train.beta=x: train.beta: expected float, got str 'x'",
    ),
    ("sweep --betas a,b", "--betas 'a,b'"),
    ("sweep --betas 0.1 --config {config} precompute.cache_dir={missing}", "{missing}: no manifest.json"),
    ("sweep --betas 0.1 --config {list}", "expected a mapping of sections"),
    ("sweep --betas 0.1 train.beta", "expected key=value"),
    # cache info / cache verify
    ("cache", "the following arguments are required: ACTION (see lora-dpo cache --help)"),
    ("cache bogus", "invalid choice: 'bogus'"),
    ("cache info", "the following arguments are required: DIR (see lora-dpo cache info --help)"),
    ("cache info {missing}", "{missing}: no manifest.json"),
    ("cache info {a_file}", "{a_file}: no manifest.json"),
    ("cache info {damaged_cache}", "{damaged_cache}/manifest.json"),
    ("cache info {cache} --bogus", "unrecognized arguments: --bogus (see lora-dpo cache info --help)"),
    ("cache verify {missing}", "{missing}: no manifest.json"),
    ("cache verify {a_file}", "{a_file}: no manifest.json"),
    ("cache verify {damaged_cache}", "{damaged_cache}/manifest.json"),
    # cache export / import / merge
    (
        "cache export {cache}",
        "the following arguments are required: --out (see lora-dpo cache export --help)",
    ),
    ("cache export {missing} --out {out}", "{missing}: no manifest.json"),
    ("cache export {damaged_cache} --out {out}", "{damaged_cache}/manifest.json"),
    (
        "cache import {a_file}",
        "the following arguments are required: --into (see lora-dpo cache import --help)",
    ),
    ("cache import {missing} --into {out}", "{missing}: not a readable parquet file"),
    ("cache import {a_file} --into {out}", "{a_file}: not a readable parquet file"),
    ("cache import {a_file} --into {cache} --no-wait=1", "ignored explicit argument '1'"),
    ("cache merge {cache}", "the following arguments are required: --into (see lora-dpo cache merge --help)"),
    ("cache merge {cache} {missing} --into {out}", "{missing}: no manifest.json"),
    ("cache merge {damaged_cache} --into {out}", "{damaged_cache}/manifest.json"),
    # merge
    ("merge", "the following arguments are required: --adapter, --out (see lora-dpo merge --help)"),
    (
        "merge --adapter {garbage_adapter} --out {out}",
        "{garbage_adapter}/adapter_config.json: not valid JSON",
    ),
    ("merge --adapter {missing} --out {out}", "--adapter {missing}: no such directory"),
    ("merge --adapter {a_file} --out {out}", "--adapter {a_file}: a file, not an adapter directory"),
    ("merge --adapter {damaged_run} --out {out}", "a train run directory with no adapter_config.json"),
    ("merge --adapter {adapter} --out {a_file}", "--out {a_file}: already exists"),
    ("merge --adapter {adapter} --out {out} --dtype int3", "argument --dtype: invalid choice: 'int3'"),
    ("merge --adapter {adapter} --out {out} --mode best", "argument --mode: invalid choice: 'best'"),
    ("merge --adapter {adapter} --out {out} --max-shard-size lots", "--max-shard-size 'lots'"),
    (
        "merge --adapter {adapter} --out {out} --base {missing}",
        "base model '{missing}' (from --base): no such directory",
    ),
    (
        "merge --adapter {adapter} --out {out} --base {a_file}",
        "base model '{a_file}' (from --base): a file, not a model",
    ),
    # demo
    ("demo --workdir {a_file}", "{a_file}"),
    ("demo --bogus", "unrecognized arguments: --bogus (see lora-dpo demo --help)"),
    # data check
    ("data", "the following arguments are required: ACTION (see lora-dpo data --help)"),
    ("data check --config {list}", "expected a mapping of sections"),
    ("data check --config {config} data.train_path={missing}", "{missing}"),
    ("data check --config {config} data.train_path={a_directory}", "{a_directory}"),
    ("data check --config {config} data.train_path={a_file}", "{a_file}"),
    ("data check --config {config} data.train_path={binary_jsonl}", "{binary_jsonl}"),
    ("data check train.beta", "expected key=value"),
    ("data check --config {binary}", "{binary}"),
    # report
    ("report", "the following arguments are required: RUN_DIR (see lora-dpo report --help)"),
    ("report {missing}", "{missing}: no metrics.jsonl here"),
    ("report {a_file}", "{a_file}: no metrics.jsonl here"),
    (
        "report {damaged_run}",
        "{damaged_run}/metrics.jsonl: no readable metrics record in 4 damaged line(s); the first: line 1 is not a record",
    ),
    (
        "report {binary_run}",
        "{binary_run}/metrics.jsonl: no readable metrics record in 9 damaged line(s); the first: line 1 is not JSON",
    ),
    # plan
    ("plan --model-config {missing}", "--model-config {missing}"),
    ("plan --model-config {binary}", "{binary}: not a model config.json"),
    ("plan --model-config {list}", "{list}: not a model config.json"),
    ("plan --gpu-gib abc", "argument --gpu-gib: invalid float value: 'abc' (see lora-dpo plan --help)"),
    ("plan --config {list}", "expected a mapping of sections"),
    ("plan train.beta", "expected key=value"),
    # no verb, or not one
    ("", "give a VERB: precompute-ref, train, eval"),
    ("bogus", "argument VERB: invalid choice: 'bogus'"),
    ("--bogus", "unrecognized arguments: --bogus (see lora-dpo --help)"),
]


def _values(row) -> tuple[str, str]:
    return tuple(row.values) if hasattr(row, "values") else row


def _row_id(row) -> str:
    return _values(row)[0] or "(no verb)"


@pytest.fixture(autouse=True)
def no_load_bars():
    """In-process, `--quiet` comes after tqdm read its environment: silence transformers' bar."""
    from transformers.utils import logging

    logging.disable_progress_bar()
    yield
    logging.enable_progress_bar()


@pytest.mark.parametrize("args, message", ROWS, ids=[_row_id(row) for row in ROWS])
def test_every_mistake_is_one_line_and_exit_2(args, message, paths, capsys):
    argv = args.format(**paths).split()
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 2, (code, captured.err)
    assert "Traceback" not in captured.err
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    assert message.format(**paths) in lines[0], lines[0]


def _verbs(parser: argparse.ArgumentParser, prefix: str = "") -> set[str]:
    """Every verb and sub-verb, as typed: `train`, `cache info`, ..."""
    found = set()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                below = _verbs(sub, f"{prefix}{name} ")
                found |= below or {prefix + name}
    return found


def test_the_table_covers_every_verb():
    """A verb added to `lora-dpo --help` without rows here fails this."""
    covered = set()
    for row in ROWS:
        words = _values(row)[0].split()
        covered |= {" ".join(words[:2]), " ".join(words[:1])}
    missing = _verbs(build_parser()) - covered
    assert not missing, f"no broken-argument rows for: {sorted(missing)}"
    assert len(_verbs(build_parser())) >= 11


def test_help_is_not_an_error(capsys):
    assert main(["merge", "--help"]) == 0
    assert "--adapter" in capsys.readouterr().out


SUBPROCESS_ROWS = [
    "merge --out {out}",
    "eval --adapter {garbage_adapter} --config {config} --quiet",
    "report {damaged_run}",
    "cache verify {damaged_cache}",
    "data check --config {config} data.train_path={missing} --quiet",
]


@pytest.mark.slow
@pytest.mark.parametrize("args", SUBPROCESS_ROWS)
def test_one_line_in_a_fresh_process(args, paths):
    """As a user runs it: the whole stderr of the process is the one line."""
    argv = args.format(**paths).split()
    result = subprocess.run(
        [sys.executable, "-m", "lora_dpo.cli", *argv], capture_output=True, text=True, cwd=ROOT, timeout=300
    )
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.splitlines()) == 1 and result.stderr.startswith("error: "), result.stderr


# ----------------------------------------------------------------------------- a full disk


def no_space(*args, **kwargs):
    """What os.fsync (or a write) raises on a full disk: ENOSPC, with no file name."""
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_full_disk_in_a_cache_build_is_one_line_and_publishes_nothing(paths, tmp_path, monkeypatch, capsys):
    """ENOSPC at the first shard: no shard, no temp file and no manifest at the cache; the build
    runs once there is space again."""
    cache = tmp_path / "cache"
    args = ["precompute-ref", "--config", paths["config"], f"precompute.cache_dir={cache}", "--quiet"]
    with monkeypatch.context() as patch:
        patch.setattr(lora_dpo.fileio, "fsync_file", no_space)
        assert main(args) == 2
    err = capsys.readouterr().err  # in-process, the build's progress bar is around the error
    errors = [line for line in err.splitlines() if "error" in line]
    assert len(errors) == 1 and "Traceback" not in err, err
    assert re.fullmatch(
        rf"error: no space left on device writing {re.escape(str(cache))} \(free there: \d+ MB\)", errors[0]
    ), err
    assert not cache.exists() or [p.name for p in cache.iterdir()] == [".lock"]  # the writer lock stays
    assert main(args) == 0
    assert (cache / "manifest.json").is_file()


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


@pytest.fixture
def rebuilt_on_a_full_disk(paths, tmp_path, monkeypatch):
    """A complete cache, then a rebuild for more pairs that hits ENOSPC at its first write:
    (the cache before, the cache after)."""
    config = load_config(paths["config"], [f"precompute.cache_dir={tmp_path / 'cache'}"])
    precompute_reference(config)
    before = _snapshot(tmp_path / "cache")
    config.data.max_pairs = 24
    with monkeypatch.context() as patch:
        patch.setattr(lora_dpo.fileio, "fsync_file", no_space)
        with pytest.raises(OSError) as caught:
            precompute_reference(config)
    assert caught.value.errno == errno.ENOSPC
    return before, _snapshot(tmp_path / "cache")


def test_a_full_disk_in_a_rebuild_keeps_every_old_shard(rebuilt_on_a_full_disk):
    before, after = rebuilt_on_a_full_disk
    shards = {name: data for name, data in before.items() if name.startswith("shard-")}
    assert shards and {name: after.get(name) for name in shards} == shards
    assert not [name for name in after if name.startswith(".") and name != ".lock"]  # no temp file left


def test_a_full_disk_in_a_rebuild_keeps_the_old_cache_whole(rebuilt_on_a_full_disk):
    before, after = rebuilt_on_a_full_disk
    # The lock file names its latest holder (pid, start time): every other file is unchanged.
    assert ".lock" in after
    assert {k: v for k, v in after.items() if k != ".lock"} == {
        k: v for k, v in before.items() if k != ".lock"
    }


@pytest.fixture
def small_disk(tmp_path):
    """A real 256 KiB file system (tmpfs) under tmp_path; skipped where mounting is not allowed."""
    where = tmp_path / "small-disk"
    where.mkdir()
    mount = ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(where)]
    if shutil.which("mount") is None or subprocess.run(mount, capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=True)


def _fill(directory: Path) -> None:
    """Write until the file system is full."""
    with (directory / "filler").open("wb", buffering=0) as handle:
        try:
            while True:
                handle.write(b"\0" * 4096)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC


def last_line_alone(stderr: str) -> str:
    """The error line of a process that got as far as a model load: the libraries' own warnings
    of the load may come before it, but no traceback and no second error."""
    assert "Traceback" not in stderr and stderr.count("error:") == 1 and stderr.endswith("\n"), stderr
    return stderr.splitlines()[-1]


@pytest.mark.slow
def test_a_really_full_disk_is_one_line(paths, small_disk):
    """No injection: the merged model does not fit in 256 KiB, and a cache build meets a full
    file system at its first shard. Each is one line, and nothing is left half-written."""

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "lora_dpo.cli", *args, "--quiet"],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=300,
        )

    out = small_disk / "merged"
    result = cli("merge", "--adapter", paths["adapter"], "--out", str(out), "--dtype", "fp32")
    assert result.returncode == 2, result.stderr
    assert (
        last_line_alone(result.stderr) == f"error: no space left on device writing {out} (free there: 0 MB)"
    )
    assert list(small_disk.iterdir()) == []

    _fill(small_disk)
    cache = small_disk / "cache"
    result = cli("precompute-ref", "--config", paths["config"], f"precompute.cache_dir={cache}")
    assert result.returncode == 2, result.stderr
    assert (
        last_line_alone(result.stderr) == f"error: no space left on device writing {cache} (free there: 0 MB)"
    )
    assert [p.name for p in cache.iterdir()] == [".lock"]  # the writer lock, and nothing half-written
