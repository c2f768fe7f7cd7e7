"""DPO started from an SFT LoRA adapter (`model.adapter_path`), continued or stacked: the
reference is base + SFT (step-0 loss exactly ln 2, the cache identity holds the adapter's
fingerprint), stack mode trains one new adapter and leaves the SFT one bit-identical, merge
folds base + SFT + DPO, resume rebuilds the same run, and bad adapters are one line."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from test_merge import argmax_agree, logits_of, max_diff
from transformers import AutoModelForCausalLM, AutoTokenizer

from lora_dpo.adapter_start import SFT_NAME, START_RECORD
from lora_dpo.cli import main as cli_main
from lora_dpo.config import ModelConfig, dump_config
from lora_dpo.demo import demo_config
from lora_dpo.demo.models import tiny_config
from lora_dpo.errors import CacheError, ConfigError
from lora_dpo.fileio import sha256_file
from lora_dpo.inputs import load_run_inputs
from lora_dpo.merge import merge
from lora_dpo.model import load_base_model
from lora_dpo.train import train
from precompute import precompute_reference
from runs import interrupt, losses

CPU = torch.device("cpu")
TOLERANCE = 1e-4  # fp32: the documented merge tolerance
MODES = ("continue", "stack")
SFT_TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]  # a subset: stack's new adapter takes all-linear


@pytest.fixture(autouse=True)
def no_load_bars():
    """In-process, `--quiet` comes after tqdm read its environment: silence transformers' bar."""
    from transformers.utils import logging

    logging.disable_progress_bar()
    yield
    logging.enable_progress_bar()


def sft_adapter(model_dir: Path, out: Path, seed: int) -> Path:
    """A real peft LoRA adapter on the tiny base, with random B factors so it is no no-op; its
    own dropout (0.1) is what a start adapter must run without."""
    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    config = PeftLoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.1, target_modules=SFT_TARGETS, task_type="CAUSAL_LM"
    )
    model = get_peft_model(base, config)
    generator = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data = torch.randn(param.shape, generator=generator) * 0.3
    model.save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def root(demo_workdir, tmp_path_factory):
    root = tmp_path_factory.mktemp("sft-start")
    for part in ("model", "data"):
        shutil.copytree(demo_workdir / part, root / part)
    sft_adapter(root / "model", root / "sft-a", seed=1)
    sft_adapter(root / "model", root / "sft-b", seed=2)
    precompute_reference(run_config(root, "continue", root / "unused"))  # the cache with sft-a
    return root


def run_config(root: Path, mode: str, output_dir: Path, adapter: str = "sft-a"):
    config = demo_config(root)
    config.model.adapter_path = str(root / adapter) if adapter else ""
    config.model.adapter_mode = mode
    config.data.max_pairs = 16
    config.data.eval_path = ""
    config.train.generate_every = 0
    config.precompute.cache_dir = str(root / f"cache-{adapter or 'none'}")
    config.train.output_dir = str(output_dir)
    config.train.overwrite_output_dir = False
    config.train.per_device_batch_size = 4
    config.train.gradient_accumulation_steps = 1
    config.train.max_steps = 4
    config.train.logging_steps = 1
    config.train.save_steps = 0
    config.lora.dropout = 0.1  # the new adapter's (stack): B = 0 at step 0, so still exact
    return config


@pytest.fixture(scope="module")
def runs(root):
    """One finished 4-step run per mode, from sft-a."""
    return {mode: train(run_config(root, mode, root / f"run-{mode}")) for mode in MODES}


def sft_tensors(root: Path) -> dict[str, torch.Tensor]:
    return load_file(str(root / "sft-a" / "adapter_model.safetensors"))


def layer_weights(policy, adapter_name: str) -> dict[str, torch.Tensor]:
    """The LoRA factors of `adapter_name` in a peft model, named as peft saves them."""
    from peft.tuners.lora import LoraLayer

    found = {}
    for name, module in policy.get_base_model().named_modules():
        if isinstance(module, LoraLayer) and adapter_name in module.lora_A:
            key = f"base_model.model.{name}"
            found[f"{key}.lora_A.weight"] = module.lora_A[adapter_name].weight.detach()
            found[f"{key}.lora_B.weight"] = module.lora_B[adapter_name].weight.detach()
    return found


@pytest.mark.parametrize("mode", MODES)
def test_step0_loss_is_ln2_and_the_sft_adapter_is_kept_or_trained(mode, runs, root):
    """The first logged loss is ln 2: the step-0 policy is exactly the cached reference (base +
    SFT, without its dropout). Stack mode trains one adapter's parameters and leaves the SFT
    factors bit-identical; continue mode trains the SFT factors themselves."""
    result = runs[mode]
    first = losses(result.output_dir)[0]
    assert first[0] == 1 and abs(first[1] - math.log(2)) < 1e-6, first
    assert losses(result.output_dir)[-1][1] < first[1] - 1e-3  # and it trained

    saved = sft_tensors(root)
    trainable = {name: p for name, p in result.policy.named_parameters() if p.requires_grad}
    exported = load_file(str(result.adapter_dir / "adapter_model.safetensors"))
    record = json.loads((result.adapter_dir / START_RECORD).read_text())
    assert record["mode"] == mode and record["adapter_path"] == str(root / "sft-a")
    if mode == "stack":
        frozen = layer_weights(result.policy, SFT_NAME)
        assert sorted(frozen) == sorted(saved)
        assert all(torch.equal(frozen[key], saved[key]) for key in saved)
        assert not any(f".{SFT_NAME}." in name for name in trainable)
        # one adapter's parameters: those of the exported DPO adapter (all-linear, lora.r=8)
        assert sum(p.numel() for p in trainable.values()) == sum(t.numel() for t in exported.values())
        assert len(exported) == 2 * 14 and all(t.shape[0] == 8 or t.shape[1] == 8 for t in exported.values())
        copy = result.adapter_dir / SFT_NAME / "adapter_model.safetensors"
        assert copy.read_bytes() == (root / "sft-a" / "adapter_model.safetensors").read_bytes()
    else:
        assert sorted(exported) == sorted(saved)  # the SFT adapter's modules, trained on
        changed = [key for key in saved if not torch.equal(exported[key], saved[key])]
        assert len(changed) == len(saved), f"unchanged: {set(saved) - set(changed)}"
        assert sum(p.numel() for p in trainable.values()) == sum(t.numel() for t in saved.values())
        assert not (result.adapter_dir / SFT_NAME).exists()


def test_the_sft_adapter_moves_the_reference(root):
    """Not a no-op: base + SFT scores differ from the base's by far more than any tolerance."""
    tokenizer = AutoTokenizer.from_pretrained(str(root / "model"))
    base = load_base_model(
        ModelConfig(name_or_path=str(root / "model")), quantize=True, dtype=torch.float32, device=CPU
    )
    texts = ["Ada is kind and curious.", "Bo is rude."]
    bare = logits_of(base, tokenizer, texts)
    with_sft = logits_of(PeftModel.from_pretrained(base, str(root / "sft-a")).eval(), tokenizer, texts)
    assert max_diff(bare, with_sft) > 0.1


def test_cache_identity_names_the_adapter_both_ways(root):
    """A cache scored without the adapter, or with another one, is another reference: refused
    in one line naming model.adapter_sha256 (and so is an adapter cache without the adapter)."""
    none = run_config(root, "stack", root / "unused", adapter="")
    precompute_reference(none)
    a = json.loads((root / "cache-sft-a" / "manifest.json").read_text())["identity"]["model"]
    assert (
        "adapter_sha256"
        not in json.loads((root / "cache-none" / "manifest.json").read_text())["identity"]["model"]
    )
    sha_a = a["adapter_sha256"]
    assert sha_a == sha256_file(root / "sft-a" / "adapter_model.safetensors")

    with_a = run_config(root, "stack", root / "unused")
    with_a.precompute.cache_dir = none.precompute.cache_dir
    with pytest.raises(
        CacheError, match=rf"model.adapter_sha256: cache was built with None, this run uses '{sha_a}'"
    ):
        load_run_inputs(with_a)
    with_b = run_config(root, "continue", root / "unused", adapter="sft-b")
    with_b.precompute.cache_dir = str(root / "cache-sft-a")
    with pytest.raises(
        CacheError,
        match=rf"model.adapter_sha256: cache was built with '{sha_a}', this run uses '[0-9a-f]{{64}}'",
    ):
        load_run_inputs(with_b)
    without = run_config(root, "continue", root / "unused", adapter="")
    without.precompute.cache_dir = str(root / "cache-sft-a")
    with pytest.raises(
        CacheError, match=rf"model.adapter_sha256: cache was built with '{sha_a}', this run uses None"
    ):
        load_run_inputs(without)


@pytest.mark.parametrize("mode", MODES)
def test_merge_folds_base_sft_and_dpo(mode, runs, root, tmp_path):
    """fp32 merged logits within 1e-4 of base + SFT + DPO built here with peft directly (stack:
    both adapters active; continue: the one trained adapter), every argmax equal; and the
    merged model is not base + DPO alone, so the check can fail."""
    run = runs[mode].output_dir
    report = merge(run, tmp_path / "merged", dtype="fp32", device=CPU)
    assert report["start"]["mode"] == mode and report["mode"] == "nf4-dequantized"
    check = report["verification"]
    assert check["max_abs_diff"] < TOLERANCE and check["argmax_all_agree"]
    # continue: the SFT adapter's 4 modules x 2 layers; stack: all-linear holds those too
    assert report["merged_layers"] == (14 if mode == "stack" else 8)

    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path / "merged"))
    texts = [
        json.loads(line)["prompt"] + " kind."
        for line in (root / "data" / "train.jsonl").read_text().splitlines()[:6]
    ]
    merged = logits_of(
        AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), dtype=torch.float32), tokenizer, texts
    )

    def base():
        return load_base_model(
            ModelConfig(name_or_path=str(root / "model")), quantize=True, dtype=torch.float32, device=CPU
        )

    dpo = PeftModel.from_pretrained(base(), str(run / "adapter"), adapter_name="dpo")
    dpo_alone = logits_of(dpo.eval(), tokenizer, texts)
    if mode == "stack":
        dpo.load_adapter(str(root / "sft-a"), adapter_name="sft")
        dpo.base_model.set_adapter(["sft", "dpo"])
    reference = logits_of(dpo.eval(), tokenizer, texts)
    diff = max_diff(merged, reference)
    print(
        f"\n{mode}: merged vs base+adapters max |Δlogit| {diff:.2e}; vs base+DPO only {max_diff(merged, dpo_alone):.2e}"
    )
    assert diff < TOLERANCE and argmax_agree(merged, reference)
    if mode == "stack":
        assert max_diff(merged, dpo_alone) > 100 * TOLERANCE


@pytest.mark.parametrize("mode", MODES)
def test_resume_from_an_adapter_start(mode, runs, root, tmp_path, monkeypatch):
    """Interrupted after step 2 and resumed: the same losses as the uninterrupted run (the
    checkpoint restores the trained adapter, the SFT one comes from adapter_path again);
    adapter_path and adapter_mode are computing keys, so a resume cannot change them."""
    config = run_config(root, mode, tmp_path / "run")
    config.train.save_steps = 2  # cosmetic: the losses are those of the run without checkpoints
    interrupt(config, 2, monkeypatch)
    other = "continue" if mode == "stack" else "stack"
    changed = run_config(root, other, tmp_path / "run")
    changed.train.save_steps = 2
    with pytest.raises(
        ConfigError, match=f"model.adapter_mode: the run used '{mode}', this resume asks for '{other}'"
    ):
        train(changed, resume=True)
    moved = run_config(root, mode, tmp_path / "run", adapter="sft-b")
    moved.precompute.cache_dir = config.precompute.cache_dir
    moved.train.save_steps = 2
    with pytest.raises(ConfigError, match="model.adapter_path: the run used"):
        train(moved, resume=True)
    result = train(config, resume=True)
    assert losses(result.output_dir) == losses(runs[mode].output_dir)
    assert (result.adapter_dir / "adapter_model.safetensors").read_bytes() == (
        runs[mode].adapter_dir / "adapter_model.safetensors"
    ).read_bytes()


def other_base_adapter(root: Path, out: Path) -> Path:
    """A real adapter of a wider tiny Llama: the same module names, other shapes."""
    tokenizer = AutoTokenizer.from_pretrained(str(root / "model"))
    wide = AutoModelForCausalLM.from_config(tiny_config("llama", vocab_size=len(tokenizer), hidden_size=48))
    config = PeftLoraConfig(r=4, lora_alpha=8, target_modules=SFT_TARGETS, task_type="CAUSAL_LM")
    get_peft_model(wide, config).save_pretrained(str(out))
    return out


def test_bad_start_adapters_are_one_line(root, tmp_path, capsys):
    """Through the CLI (precompute-ref, which loads the reference): each mistake one line."""
    dora = tmp_path / "dora"
    shutil.copytree(root / "sft-a", dora)
    config = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    prefix = tmp_path / "prefix"
    prefix.mkdir()
    (prefix / "adapter_config.json").write_text(json.dumps({"peft_type": "PREFIX_TUNING"}))
    extra = tmp_path / "extra-module"
    shutil.copytree(root / "sft-a", extra)
    tensors = load_file(str(extra / "adapter_model.safetensors"))
    tensors = {key.replace("layers.1.", "layers.7."): value for key, value in tensors.items()}
    save_file(tensors, str(extra / "adapter_model.safetensors"))
    (tmp_path / "file").write_text("")
    cases = [
        (tmp_path / "nothing", "model.adapter_path=", "no such directory"),
        (tmp_path / "file", "model.adapter_path=", "a file, not an adapter directory"),
        (prefix, "peft_type='PREFIX_TUNING'", "only LoRA adapters are supported"),
        (dora, "a DoRA adapter (use_dora) cannot start DPO", "plain LoRA only"),
        (
            other_base_adapter(root, tmp_path / "wide"),
            "model.adapter_path: ",
            "does not fit the base",
            "the base's",
            "inputs",
        ),
        (extra, "model.adapter_path: ", "adapts model.layers.7.", "which the base"),
    ]
    for number, (adapter, *expected) in enumerate(cases):
        config = run_config(root, "stack", tmp_path / "run")
        config.model.adapter_path = str(adapter)
        config.precompute.cache_dir = str(tmp_path / f"cache-{number}")
        config_file = tmp_path / f"config-{number}.yaml"
        config_file.write_text(dump_config(config))
        assert cli_main(["precompute-ref", "--quiet", "--config", str(config_file)]) == 2
        err = capsys.readouterr().err
        lines = err.splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
        assert all(part in lines[0] for part in expected), lines[0]
    assert (
        cli_main(["precompute-ref", "--config", str(tmp_path / "config-0.yaml"), "model.adapter_mode=both"])
        == 2
    )
    assert "model.adapter_mode='both': must be one of continue, stack" in capsys.readouterr().err


@pytest.mark.parametrize("mode", MODES)
def test_generations_compare_with_base_plus_sft(mode, runs, root):
    """The reference that samples and the win-rate judge generate from is base + SFT, not the
    bare base: inside `as_reference` a loaded export computes base + sft-a's logits (stack:
    only "sft" active; continue: the start adapter loaded from its path), and afterwards the
    policy's own logits and gradient flags are back."""
    from lora_dpo.adapter_start import as_reference
    from lora_dpo.model import load_adapter

    def base():
        return load_base_model(
            ModelConfig(name_or_path=str(root / "model")), quantize=True, dtype=torch.float32, device=CPU
        )

    tokenizer = AutoTokenizer.from_pretrained(str(root / "model"))
    texts = [
        json.loads(line)["prompt"] + " kind."
        for line in (root / "data" / "train.jsonl").read_text().splitlines()[:4]
    ]
    sft = logits_of(PeftModel.from_pretrained(base(), str(root / "sft-a")).eval(), tokenizer, texts)
    bare = logits_of(base().eval(), tokenizer, texts)
    policy = load_adapter(base(), runs[mode].output_dir / "adapter", trainable=True)
    before = logits_of(policy.eval(), tokenizer, texts)
    flags = {name: p.requires_grad for name, p in policy.named_parameters()}
    with as_reference(policy):
        reference = logits_of(policy, tokenizer, texts)
    assert max_diff(reference, sft) < 1e-5 and max_diff(sft, bare) > 0.1
    assert max_diff(before, sft) > 1e-3  # the trained policy is not its reference
    assert max_diff(logits_of(policy, tokenizer, texts), before) == 0.0
    after = {name: p.requires_grad for name, p in policy.named_parameters()}
    assert {name: after[name] for name in flags} == flags and any(flags.values())
    assert not any(after[name] for name in after.keys() - flags.keys())  # continue: "start" is frozen
