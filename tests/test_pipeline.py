"""Precompute-ref then train, end to end on a tiny real 4-bit Llama: the invariants that make
a cached-reference DPO trainer trustworthy."""

from __future__ import annotations

import json
import math

import bitsandbytes as bnb
import pytest
import torch
from transformers import AutoModelForCausalLM

import lora_dpo.model as model_module  # build_policy attaches through it
from lora_dpo.batching import collate, pad_id_of
from lora_dpo.cache import ReferenceCache
from lora_dpo.config import Config
from lora_dpo.data import load_preference_data
from lora_dpo.demo import demo_config
from lora_dpo.errors import CacheError
from lora_dpo.logps import sequence_logps
from lora_dpo.losses import dpo_loss
from lora_dpo.model import attach_lora, load_base_model, load_tokenizer
from lora_dpo.train import train
from precompute import precompute_reference


def small_config(workdir, tmp_path, **train_overrides) -> Config:
    config = demo_config(workdir)
    config.data.max_pairs = 48
    config.precompute.cache_dir = str(workdir / "cache-48")
    config.train.output_dir = str(tmp_path / "run")
    config.train.per_device_batch_size = 4
    config.train.gradient_accumulation_steps = 2
    config.train.max_steps = 3
    config.train.logging_steps = 1
    config.lora.dropout = 0.05  # default-like: dropout must not break the step-0 identity
    for key, value in train_overrides.items():
        setattr(config.train, key, value)
    return config


@pytest.fixture(scope="module")
def cached_workdir(demo_workdir):
    """The demo fixture with a reference cache over its first 48 train pairs and its eval pairs."""
    config = demo_config(demo_workdir)
    config.data.max_pairs = 48
    config.precompute.cache_dir = str(demo_workdir / "cache-48")
    precompute_reference(config)
    return demo_workdir


def test_step0_loss_is_ln2_and_rewards_zero(cached_workdir, tmp_path):
    """Cache built from the same nf4 base, fp32 compute: before any update the policy is the
    reference, so the first batch's loss is ln 2 and every reward is 0."""
    result = train(small_config(cached_workdir, tmp_path, max_steps=1))
    first = result.history[0]
    assert first["step"] == 1
    assert abs(first["loss"] - math.log(2)) < 1e-6
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert abs(first[key]) < 1e-6, key


def test_training_changes_lora_only_and_saves_peft_adapter(cached_workdir, tmp_path, monkeypatch):
    snapshots = {}
    real_attach = model_module.attach_lora

    def attach_and_snapshot(model, *args, **kwargs):
        policy = real_attach(model, *args, **kwargs)
        snapshots.update({k: v.detach().clone() for k, v in policy.state_dict().items()})
        return policy

    monkeypatch.setattr(model_module, "attach_lora", attach_and_snapshot)
    result = train(small_config(cached_workdir, tmp_path))
    after = result.policy.state_dict()

    lora_keys = [k for k in snapshots if "lora_" in k]
    base_keys = [k for k in snapshots if "lora_" not in k]
    assert lora_keys and base_keys
    assert all(not torch.equal(snapshots[k], after[k]) for k in lora_keys if "lora_B" in k)
    assert any(not torch.equal(snapshots[k], after[k]) for k in lora_keys if "lora_A" in k)
    for key in base_keys:  # packed nf4 bytes, quantization statistics, norms, embeddings, head
        assert torch.equal(snapshots[key], after[key]), f"base weight {key} changed"
    quantized = [m for m in result.policy.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(quantized) == 14  # 2 layers x (q, k, v, o, gate, up, down)

    adapter = result.adapter_dir
    assert (adapter / "adapter_model.safetensors").is_file()
    assert json.loads((adapter / "adapter_config.json").read_text())["peft_type"] == "LORA"
    assert (result.output_dir / "config.yaml").is_file()
    records = [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if "loss" in r]
    assert [r["step"] for r in train_records] == [1, 2, 3]
    for name in (
        "loss",
        "rewards/chosen",
        "rewards/rejected",
        "rewards/accuracies",
        "rewards/margins",
        "logps/chosen",
        "logps/rejected",
        "lr",
        "grad_norm",
        "tokens_per_s",
    ):
        assert all(math.isfinite(r[name]) for r in train_records), name
    assert {"eval/rewards/accuracies", "eval/rewards/margins"} <= set(records[-1])


def test_no_second_model_is_loaded_during_training(cached_workdir, tmp_path, monkeypatch):
    loads = []
    real = AutoModelForCausalLM.from_pretrained.__func__

    def counting(cls, *args, **kwargs):
        loads.append(args[0] if args else kwargs.get("pretrained_model_name_or_path"))
        return real(cls, *args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(counting))
    result = train(small_config(cached_workdir, tmp_path, max_steps=1))
    assert len(loads) == 1, loads
    decoders = [m for m in result.policy.modules() if type(m).__name__ == "LlamaModel"]
    assert len(decoders) == 1


def _training_step_grads(model, batch, ref_chosen, ref_rejected):
    model.train()
    out = sequence_logps(model, batch)
    loss = dpo_loss(out.chosen, out.rejected, ref_chosen, ref_rejected, beta=0.1).losses.mean()
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    grads = torch.autograd.grad(loss, list(params.values()))
    return dict(zip(params, grads))


def _fresh_policy(config, guard: bool):
    model = load_base_model(config.model, quantize=True, dtype=torch.float32, device=torch.device("cpu"))
    if not guard:  # what a model straight from from_pretrained does
        for module in model.modules():
            if isinstance(module, bnb.nn.Linear4bit):
                module.support_avx512bf16_for_cpu = bnb.nn.modules.has_avx512bf16()
    torch.manual_seed(0)
    policy = attach_lora(model, config.lora, gradient_checkpointing=True)
    with torch.no_grad():  # non-zero B, so the gradient through the base reaches lora_A
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
    return policy


def _eval_then_train_grads(config, batch, guard: bool):
    clean = _training_step_grads(_fresh_policy(config, guard), batch, *_refs(batch))
    policy = _fresh_policy(config, guard)
    policy.eval()
    with torch.no_grad():
        sequence_logps(policy, batch)  # a precompute/eval forward: eval mode, no grad
    after_eval = _training_step_grads(policy, batch, *_refs(batch))
    return clean, after_eval


def _refs(batch):
    return torch.full((batch.num_pairs,), -30.0), torch.full((batch.num_pairs,), -30.0)


def test_eval_forward_does_not_corrupt_training_gradients(demo_workdir):
    """bitsandbytes repacks a CPU Linear4bit for good on its first eval-mode no-grad forward;
    afterwards its backward loses the gradient. Training must never run on repacked weights."""
    config = demo_config(demo_workdir)
    tokenizer = load_tokenizer(config.model)
    pairs, _ = load_preference_data(config.data, tokenizer, "train")
    batch = collate(pairs[:4], pad_id_of(tokenizer))

    clean, after_eval = _eval_then_train_grads(config, batch, guard=True)
    for name in clean:
        assert torch.equal(clean[name], after_eval[name]), name

    if not bnb.nn.modules.has_avx512bf16():
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes never repacks here")
    # Control: without the guard the same sequence does corrupt gradients on this CPU,
    # so the assertion above can fail.
    clean, after_eval = _eval_then_train_grads(config, batch, guard=False)
    assert any(not torch.allclose(clean[n], after_eval[n]) for n in clean if "lora_A" in n)


def test_missing_pair_is_a_clear_error(cached_workdir, tmp_path):
    config = small_config(cached_workdir, tmp_path)
    config.data.max_pairs = 64  # 16 pairs more than the cache holds
    with pytest.raises(CacheError, match=r"16 of 64 train pairs are not in the reference cache"):
        train(config)


def test_cache_for_other_tokenization_is_refused(cached_workdir, tmp_path):
    config = small_config(cached_workdir, tmp_path)
    config.data.max_length = 128
    with pytest.raises(CacheError, match=r"max_length: cache was built with 64, this run uses 128"):
        train(config)


def test_precompute_resumes_from_complete_shards(cached_workdir, tmp_path):
    config = demo_config(cached_workdir)
    config.data.max_pairs = 48
    config.precompute.shard_size = 16
    config.precompute.cache_dir = str(tmp_path / "cache")
    precompute_reference(config)
    whole = ReferenceCache(config.precompute.cache_dir)
    # An interruption: the manifest and the last shard never got written.
    (tmp_path / "cache" / "manifest.json").unlink()
    last = whole.manifest.shards[-1].file
    (tmp_path / "cache" / last).unlink()
    precompute_reference(config)
    resumed = ReferenceCache(config.precompute.cache_dir)
    assert resumed.pair_hashes == whole.pair_hashes
    assert torch.equal(resumed.chosen_logps, whole.chosen_logps)
    assert torch.equal(resumed.rejected_logps, whole.rejected_logps)
    assert [s.sha256 for s in resumed.manifest.shards] == [s.sha256 for s in whole.manifest.shards]


def test_corrupted_shard_is_named(cached_workdir, tmp_path):
    import shutil

    cache_dir = tmp_path / "cache"
    shutil.copytree(cached_workdir / "cache-48", cache_dir)
    shard = cache_dir / "shard-00000.safetensors"
    shard.write_bytes(shard.read_bytes()[:-7])
    with pytest.raises(CacheError, match=r"shard-00000.safetensors: checksum mismatch"):
        ReferenceCache(cache_dir)


def test_finished_run_is_not_overwritten(cached_workdir, tmp_path):
    from lora_dpo.errors import ConfigError

    config = small_config(cached_workdir, tmp_path, max_steps=1, overwrite_output_dir=False)
    train(config)
    adapter = (tmp_path / "run" / "adapter" / "adapter_model.safetensors").read_bytes()
    with pytest.raises(ConfigError, match=r"already holds a trained run"):
        train(config)
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").read_bytes() == adapter
    config.train.overwrite_output_dir = True
    train(config)
