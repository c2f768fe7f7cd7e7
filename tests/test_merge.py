"""`lora-dpo merge`: the merged model reproduces base+adapter, is a plain transformers model,
and an interrupted merge leaves nothing that looks complete."""

from __future__ import annotations

import errno
import gc
import json
import logging
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
import weakref
from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import lora_dpo.merge as merge_module
from lora_dpo.cli import main as cli_main
from lora_dpo.config import ModelConfig
from lora_dpo.demo import demo_config
from lora_dpo.errors import ConfigError
from lora_dpo.merge import find_adapter, merge, merge_to_state_dict, resolve_mode
from lora_dpo.merge_device import choose_merged_device, margin_bytes, merged_model_bytes, requested_device
from lora_dpo.model import load_adapter, load_base_model
from lora_dpo.train import train
from precompute import precompute_reference

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
TOLERANCE = 1e-4  # fp32 compute: the documented merge tolerance
REPORT = merge_module.REPORT


@pytest.fixture(scope="module")
def trained_run(demo_workdir, tmp_path_factory):
    """A short QLoRA DPO run on the demo task: a real trained adapter, not a random one."""
    config = demo_config(demo_workdir)
    config.data.max_pairs = 32
    config.precompute.cache_dir = str(demo_workdir / "cache-merge")
    config.train.output_dir = str(tmp_path_factory.mktemp("merge") / "run")
    config.train.max_steps = 6
    config.train.logging_steps = 6
    precompute_reference(config)
    result = train(config)
    return result.output_dir


@pytest.fixture(scope="module")
def probe_texts(demo_workdir):
    """Held-out demo pairs (prompt + chosen, prompt + rejected): not the merge's own prompts."""
    rows = [json.loads(line) for line in (demo_workdir / "data" / "eval.jsonl").read_text().splitlines()[:4]]
    return [row["prompt"] + row[key] for row in rows for key in ("chosen", "rejected")]


def logits_of(model, tokenizer, texts):
    """[T_i, V] logits of each text at its real positions, from one right-padded batch."""
    ids = [tokenizer(t).input_ids for t in texts]
    lengths = [len(row) for row in ids]
    input_ids = torch.zeros(len(ids), max(lengths), dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    for i, row in enumerate(ids):
        input_ids[i, : len(row)], mask[i, : len(row)] = torch.tensor(row), 1
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=mask).logits.float()
    return [row[:n] for row, n in zip(logits, lengths)]


def max_diff(a, b):
    return max((x - y).abs().max().item() for x, y in zip(a, b))


def argmax_agree(a, b):
    return all(torch.equal(x.argmax(-1), y.argmax(-1)) for x, y in zip(a, b))


def base_plus_adapter(model_dir, adapter_dir, quantized: bool):
    base = load_base_model(
        ModelConfig(name_or_path=str(model_dir)), quantize=quantized, dtype=torch.float32, device=CPU
    )
    return load_adapter(base, adapter_dir).eval()


@pytest.mark.parametrize("mode", ["nf4-dequantized", "original"])
def test_merged_model_matches_base_plus_adapter(mode, trained_run, demo_workdir, probe_texts, tmp_path):
    """Acceptance: fp32 merged logits within 1e-4 of base+adapter, argmax equal at every
    position, where the reference is the base the mode merges into (4-bit as trained, or the
    original weights). The comparisons are computed here, independently of merge's own check."""
    out = tmp_path / "merged"
    report = merge(trained_run, out, mode=mode, dtype="fp32", max_shard_size="100KB", device=CPU)

    tokenizer = AutoTokenizer.from_pretrained(str(out))
    merged = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)  # plain transformers
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in merged.modules())
    merged_logits = logits_of(merged, tokenizer, probe_texts)

    model_dir = demo_workdir / "model"
    reference = base_plus_adapter(model_dir, trained_run / "adapter", quantized=mode == "nf4-dequantized")
    reference_logits = logits_of(reference, tokenizer, probe_texts)
    with reference.disable_adapter():
        bare_logits = logits_of(reference, tokenizer, probe_texts)
    other = base_plus_adapter(model_dir, trained_run / "adapter", quantized=mode != "nf4-dequantized")
    other_logits = logits_of(other, tokenizer, probe_texts)

    diff = max_diff(merged_logits, reference_logits)
    print(
        f"\n{mode}: probe max |Δlogit| {diff:.3e}; adapter effect {max_diff(reference_logits, bare_logits):.3e}; "
        f"vs the other base {max_diff(merged_logits, other_logits):.3e}; merge report {report['verification']}"
    )
    assert diff < TOLERANCE
    assert argmax_agree(merged_logits, reference_logits)
    # The check can fail: the adapter moves the logits far more than the tolerance, and so
    # does merging into the other base.
    assert max_diff(reference_logits, bare_logits) > 100 * TOLERANCE
    assert max_diff(merged_logits, other_logits) > 10 * TOLERANCE

    check = report["verification"]
    assert (
        check["max_abs_diff"] < TOLERANCE and check["argmax_all_agree"] and check["argmax_agreement"] == 1.0
    )
    assert check["positions"] > 100
    assert report["mode"] == mode and report["merged_layers"] == 14 and report["dequantized_layers"] == 0


def test_merged_directory_is_a_plain_model(trained_run, tmp_path, capsys):
    """Default mode, through the CLI: sharded safetensors, tokenizer, generation config, report;
    nothing of peft or bitsandbytes left in config.json."""
    out = tmp_path / "merged"
    code = cli_main(
        [
            "merge",
            "--adapter",
            str(trained_run),
            "--out",
            str(out),
            "--dtype",
            "fp32",
            "--max-shard-size",
            "100KB",
            "--quiet",
        ]
    )
    assert code == 0
    assert "argmax agreement 1.0000" in capsys.readouterr().out
    files = {p.name for p in out.iterdir()}
    assert {
        "config.json",
        "generation_config.json",
        "model.safetensors.index.json",
        REPORT,
        "tokenizer.json",
        "tokenizer_config.json",
    } <= files
    assert len([f for f in files if f.endswith(".safetensors")]) > 1  # sharded at 100KB
    assert not files & {"adapter_config.json", "adapter_model.safetensors"}
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "float32"
    assert "bitsandbytes" not in (out / "config.json").read_text()
    report = json.loads((out / REPORT).read_text())
    assert report["mode"] == "nf4-dequantized" and report["mode_reason"].startswith("default")
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o777 & ~umask  # not the temp dir's private 0700
    assert stat.S_IMODE(os.stat(out / REPORT).st_mode) == 0o666 & ~umask
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp left behind


def test_existing_output_is_kept_unless_overwrite(trained_run, tmp_path):
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match=r"already exists; choose another directory or pass --overwrite"):
        merge(trained_run, out, dtype="fp32", device=CPU)
    assert (out / "keep.txt").read_text() == "mine"
    merge(trained_run, out, mode="original", dtype="fp32", overwrite=True, device=CPU)
    assert not (out / "keep.txt").exists() and (out / REPORT).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]


def test_user_mistakes_are_one_line(trained_run, tmp_path, capsys):
    cases = [
        (["--adapter", str(tmp_path / "nothing")], "no adapter_config.json"),
        (["--adapter", str(trained_run), "--max-shard-size", "lots"], "--max-shard-size 'lots'"),
        (["--adapter", str(trained_run), "--base", str(tmp_path / "no-model")], "base model"),
    ]
    for args, message in cases:
        assert cli_main(["merge", "--out", str(tmp_path / "out"), *args]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err, err
    # --overwrite must never reach the adapter (or the base) it is reading
    adapter = trained_run / "adapter"
    assert cli_main(["merge", "--adapter", str(trained_run), "--out", str(adapter), "--overwrite"]) == 2
    assert "overlaps the input" in capsys.readouterr().err
    assert (adapter / "adapter_model.safetensors").is_file()
    assert not (tmp_path / "out").exists()


def test_default_mode_follows_what_training_saw(trained_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    source = find_adapter(run / "adapter")
    assert source.adapter_dir == run / "adapter" and resolve_mode(None, source)[0] == "nf4-dequantized"
    config = (run / "config.yaml").read_text()
    (run / "config.yaml").write_text(config.replace("quantization: nf4", "quantization: none"))
    source = find_adapter(run)
    assert resolve_mode(None, source)[0] == "original"
    with pytest.raises(ConfigError, match=r"trained on the unquantized base"):
        resolve_mode("nf4-dequantized", source)


def test_any_peft_adapter_dir_tied_embeddings_and_partial_targets(tiny_tokenizer, tmp_path):
    """A bare PEFT adapter (no run directory, no tokenizer beside it) on a tied-embedding Qwen2,
    adapting q/v only: the other 4-bit layers are dequantized, the base path comes from
    --base, and the merged model still matches base+adapter."""
    from peft import LoraConfig, get_peft_model

    from lora_dpo.demo.models import tiny_config

    config = tiny_config("qwen2", vocab_size=len(tiny_tokenizer), hidden_size=32)
    config.tie_word_embeddings = True
    torch.manual_seed(1)
    AutoModelForCausalLM.from_config(config).save_pretrained(str(tmp_path / "base"))
    tiny_tokenizer.save_pretrained(str(tmp_path / "base"))
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "base"))  # records its path
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.2)
    peft_model.save_pretrained(str(tmp_path / "adapter"))
    shutil.move(str(tmp_path / "base"), str(tmp_path / "moved-base"))  # the recorded path is stale

    with pytest.raises(ConfigError, match=r"base model"):
        merge(tmp_path / "adapter", tmp_path / "merged", dtype="fp32", device=CPU)
    report = merge(
        tmp_path / "adapter", tmp_path / "merged", base=str(tmp_path / "moved-base"), dtype="fp32", device=CPU
    )
    assert report["mode"] == "nf4-dequantized"
    assert report["merged_layers"] == 4 and report["dequantized_layers"] == 10
    assert report["verification"]["max_abs_diff"] < TOLERANCE and report["verification"]["argmax_all_agree"]
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"))
    assert merged.config.tie_word_embeddings
    assert merged.lm_head.weight.data_ptr() == merged.model.embed_tokens.weight.data_ptr()


def test_layers_are_freed_as_they_are_merged(trained_run, demo_workdir, monkeypatch):
    """The memory bound's mechanism: each 4-bit layer is released once it is merged, so the
    merged copy grows while the 4-bit one shrinks (never both whole, plus one fp32 layer)."""
    model = base_plus_adapter(demo_workdir / "model", trained_run / "adapter", quantized=True)
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    alive = [weakref.ref(m) for m in layers] + [weakref.ref(m.weight) for m in layers]  # modules, 4-bit data
    assert len(layers) == 14
    del layers
    seen = []
    real = merge_module.full_precision_weight

    def counting(layer):
        seen.append(sum(ref() is not None for ref in alive))
        return real(layer)

    monkeypatch.setattr(merge_module, "full_precision_weight", counting)
    gc.disable()  # freed by reference counting, not by a lucky collection
    try:
        state, counts = merge_to_state_dict(model, torch.float32)
    finally:
        gc.enable()
    assert seen == [2 * n for n in range(14, 0, -1)]  # the k-th merge sees only the layers not yet merged
    assert counts == {"merged_layers": 14, "dequantized_layers": 0}
    assert all(t.dtype == torch.float32 for t in state.values())


GIB = 2**30


def test_merge_device_decision_covers_every_branch():
    """The GPU only when the merged model and its margin fit the free memory, or when asked for."""
    fp32_8b, bf16_8b = 30 * GIB, 15 * GIB  # an 8B model merged at fp32 / bf16
    assert margin_bytes(bf16_8b) == int(1.5 * GIB) and margin_bytes(1000) == GIB
    assert choose_merged_device("cpu", bf16_8b, 100 * GIB, True)[0] == "cpu"  # asked for
    assert choose_merged_device("auto", bf16_8b, None, False) == ("cpu", "auto: no CUDA GPU")
    where, why = choose_merged_device("auto", fp32_8b, 18 * GIB, True)  # a 24 GiB card, base loaded
    assert where == "cpu" and why.startswith("auto: does not fit the GPU") and "33.00 GiB needed" in why
    assert choose_merged_device("auto", bf16_8b, 18 * GIB, True)[0] == "cuda"
    need = bf16_8b + margin_bytes(bf16_8b)
    assert choose_merged_device("auto", bf16_8b, need, True)[0] == "cuda"  # exactly fits
    assert choose_merged_device("auto", bf16_8b, need - 1, True)[0] == "cpu"
    where, why = choose_merged_device("cuda", fp32_8b, 18 * GIB, True)  # asked for, even if tight
    assert where == "cuda" and why.startswith("chosen (--device cuda)")
    with pytest.raises(ConfigError, match=r"^--device cuda: no CUDA GPU is available"):
        choose_merged_device("cuda", bf16_8b, None, False)
    assert [requested_device(d) for d in (None, "auto", CPU, torch.device("cuda", 1))] == [
        "auto",
        "auto",
        "cpu",
        "cuda",
    ]
    with pytest.raises(ConfigError, match=r"--device 'gpu': must be one of auto, cpu, cuda"):
        requested_device("gpu")


def unique_bytes(state: dict[str, torch.Tensor]) -> int:
    """Bytes of a state dict's tensors, a tied tensor once."""
    return sum(t.numel() * t.element_size() for t in {t.data_ptr(): t for t in state.values()}.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merging_layer_by_layer_onto_a_device_equals_merging_in_place(trained_run, demo_workdir, dtype):
    """The merged tensors moved to `device` one layer at a time are today's in-place merge,
    bit for bit; the size the device choice uses is the merged model's exact size."""
    model_dir, adapter_dir = demo_workdir / "model", trained_run / "adapter"
    in_place_model = base_plus_adapter(model_dir, adapter_dir, quantized=True)
    size = merged_model_bytes(in_place_model, dtype)
    in_place, counts = merge_to_state_dict(in_place_model, dtype)
    moved, moved_counts = merge_to_state_dict(
        base_plus_adapter(model_dir, adapter_dir, quantized=True), dtype, CPU
    )
    assert counts == moved_counts and sorted(in_place) == sorted(moved)
    assert all(torch.equal(in_place[k], moved[k]) and moved[k].device == CPU for k in in_place)
    assert all(t.dtype == dtype for t in moved.values())
    assert size == unique_bytes(moved)


def merge_cli(adapter: Path, out: Path, *extra: str) -> int:
    return cli_main(
        ["merge", "--adapter", str(adapter), "--out", str(out), "--dtype", "fp32", "--quiet", *extra]
    )


def test_device_cpu_and_auto_write_the_same_model(trained_run, tmp_path, capsys):
    """`--device cpu` and the default `auto` (the CPU without a GPU) write identical tensors;
    `--device cuda` without a GPU is a one-line error."""
    assert merge_cli(trained_run, tmp_path / "cpu", "--device", "cpu") == 0
    assert merge_cli(trained_run, tmp_path / "auto") == 0
    on_cpu, auto = (load_file(str(tmp_path / name / "model.safetensors")) for name in ("cpu", "auto"))
    assert sorted(on_cpu) == sorted(auto) and all(torch.equal(on_cpu[k], auto[k]) for k in on_cpu)
    report = json.loads((tmp_path / "cpu" / REPORT).read_text())
    assert report["device"] == {"load": "cpu", "merged": "cpu", "reason": "chosen (--device cpu)"}
    if not torch.cuda.is_available():
        assert json.loads((tmp_path / "auto" / REPORT).read_text())["device"]["reason"] == "auto: no CUDA GPU"
        capsys.readouterr()
        assert merge_cli(trained_run, tmp_path / "cuda", "--device", "cuda") == 2
        err = capsys.readouterr().err.strip()
        assert err == "error: --device cuda: no CUDA GPU is available; use --device cpu or auto"
        assert not (tmp_path / "cuda").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_merged_layers_built_on_the_cpu_equal_the_gpu_merge(trained_run, demo_workdir):
    """On a GPU: dequantized and folded there, moved to the CPU layer by layer, the merged
    tensors equal those of the whole merge on the GPU."""
    cuda = torch.device("cuda")

    def on_gpu():
        base = load_base_model(
            ModelConfig(name_or_path=str(demo_workdir / "model")),
            quantize=True,
            dtype=torch.bfloat16,
            device=cuda,
        )
        return load_adapter(base, trained_run / "adapter").eval()

    whole, _ = merge_to_state_dict(on_gpu(), torch.bfloat16)
    moved, _ = merge_to_state_dict(on_gpu(), torch.bfloat16, CPU)
    assert all(whole[k].device.type == "cuda" and moved[k].device == CPU for k in whole)
    assert all(torch.equal(whole[k].cpu(), moved[k]) for k in whole)


@pytest.mark.slow
def test_killed_merge_leaves_no_complete_output(trained_run, tmp_path, caplog):
    """SIGKILL while the merged model is being written: the target does not exist, and the
    hidden partial directory has no report and is not a loadable model at the target path."""
    out = tmp_path / "merged"
    command = [
        sys.executable,
        "-m",
        "lora_dpo.cli",
        "merge",
        "--adapter",
        str(trained_run),
        "--out",
        str(out),
        "--dtype",
        "fp32",
        "--max-shard-size",
        "20KB",
        "--quiet",
    ]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    partial = None
    deadline = time.monotonic() + 120
    try:
        while partial is None and process.poll() is None and time.monotonic() < deadline:
            for entry in tmp_path.iterdir():  # the first shard written
                if entry.name.endswith(".partial") and any(
                    p.suffix == ".safetensors" for p in entry.iterdir()
                ):
                    partial = entry
                    break
            else:
                time.sleep(0.001)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait()
    assert partial is not None, "the merge finished before it could be interrupted"
    assert process.returncode == -signal.SIGKILL
    assert not out.exists()
    assert partial.name.startswith(".")  # hidden, and named as partial
    assert not (partial / REPORT).exists()
    with pytest.raises(OSError):
        AutoModelForCausalLM.from_pretrained(str(out))

    # Run again: the stale partial is pointed out, does not get in the way, and the output is complete.
    with caplog.at_level(logging.WARNING, logger="lora_dpo.merge"):
        merge(trained_run, out, dtype="fp32", device=CPU)
    assert "left by interrupted merges" in caplog.text and partial.name in caplog.text
    assert (out / REPORT).is_file()
    AutoModelForCausalLM.from_pretrained(str(out))


def no_space(*args, **kwargs):
    """What os.fsync (or a write) raises on a full disk: ENOSPC, with no file name."""
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def shard_writer_out_of_space(real):
    """transformers' safetensors writer on a full disk: part of the shard is written, then the
    Rust writer reports the OS error in its message (not as an OSError)."""

    def save(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)
        Path(filename).write_bytes(Path(filename).read_bytes()[:100])
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    return save


@pytest.mark.parametrize("where", ["shard", "fsync"])
@pytest.mark.parametrize("overwrite", [False, True])
def test_a_full_disk_leaves_the_target_as_it_was(
    where, overwrite, trained_run, tmp_path, monkeypatch, capsys
):
    """A full disk while the merged model is written (mid-shard, or at the fsync before the
    rename): the target is untouched (absent, or the earlier merge byte for byte), no temp
    directory is left, and the CLI says so in one line."""
    import transformers.modeling_utils

    import lora_dpo.fileio

    out = tmp_path / "merged"
    before = {}
    if overwrite:
        merge(trained_run, out, mode="original", dtype="fp32", device=CPU)
        before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    if where == "shard":
        monkeypatch.setattr(
            transformers.modeling_utils,
            "safe_save_file",
            shard_writer_out_of_space(transformers.modeling_utils.safe_save_file),
        )
    else:
        monkeypatch.setattr(lora_dpo.fileio, "fsync_file", no_space)
    args = ["merge", "--adapter", str(trained_run), "--out", str(out), "--dtype", "fp32", "--quiet"]
    assert cli_main(args + (["--overwrite"] if overwrite else [])) == 2
    err = (
        capsys.readouterr().err
    )  # in-process, progress bars precede the error (--quiet acts on a fresh process)
    assert re.fullmatch(
        rf"error: no space left on device writing {re.escape(str(out))} \(free there: \d+ MB\)",
        err.splitlines()[-1],
    ), err
    assert err.count("error") == 1 and "Traceback" not in err
    if overwrite:
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    else:
        assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == (["merged"] if overwrite else [])
