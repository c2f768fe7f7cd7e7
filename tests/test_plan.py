"""`lora-dpo plan`: weight counts against real models (exact), nf4 bytes against a real
bitsandbytes model, LoRA counts against peft; the memory settings it assumes are the ones the
trainer uses; the three 24 GB recipes fit; the CLI prints a breakdown or a clear error."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from lora_dpo.architecture import Architecture
from lora_dpo.cli import main
from lora_dpo.config import LoraConfig, ModelConfig, load_config
from lora_dpo.demo.models import ARCHITECTURES, tiny_config
from lora_dpo.errors import ConfigError
from lora_dpo.model import attach_lora, load_base_model
from lora_dpo.plan import (
    DDP_GRADIENT_AS_BUCKET_VIEW,
    NF4_BYTES_PER_WEIGHT,
    Workload,
    estimate,
    find_max_length,
    find_model_config,
    last_layer_backward_bytes,
    layer_saved_bytes_per_token,
)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

# The public config.json values of the three recipes' models (architecture fields only).
RECIPE_MODELS = {
    "llama3.1-8b.yaml": {
        "model_type": "llama",
        "vocab_size": 128256,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "tie_word_embeddings": False,
    },
    "qwen2.5-7b.yaml": {
        "model_type": "qwen2",
        "vocab_size": 152064,
        "hidden_size": 3584,
        "intermediate_size": 18944,
        "num_hidden_layers": 28,
        "num_attention_heads": 28,
        "num_key_value_heads": 4,
        "tie_word_embeddings": False,
    },
    "mistral-7b.yaml": {
        "model_type": "mistral",
        "vocab_size": 32768,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "tie_word_embeddings": False,
    },
}


def saved_model(tmp_path: Path, arch: str, hidden: int = 64) -> tuple[Path, torch.nn.Module]:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, vocab_size=300, hidden_size=hidden))
    model.save_pretrained(str(tmp_path / arch))
    return tmp_path / arch, model


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_weight_counts_are_exact(tmp_path, arch: str):
    path, model = saved_model(tmp_path, arch)
    plan_arch = Architecture.from_config_json(path / "config.json")
    linear = sum(
        m.weight.numel()
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and "lm_head" not in name
    )
    assert plan_arch.linear_weights == linear
    assert plan_arch.linear_weights + plan_arch.other_weights == sum(p.numel() for p in model.parameters())


def test_nf4_bytes_match_bitsandbytes(tmp_path):
    path, _ = saved_model(tmp_path, "llama", hidden=128)
    model = load_base_model(
        ModelConfig(name_or_path=str(path)), quantize=True, dtype=torch.float32, device=torch.device("cpu")
    )
    import bitsandbytes as bnb

    stored = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            state = module.weight.quant_state
            # packed 4-bit codes, 8-bit block scales, fp32 second-level scales (the 16- and
            # 256-entry lookup tables are per layer, not per weight)
            stored += module.weight.numel() * module.weight.element_size()
            stored += state.absmax.numel() * state.absmax.element_size()
            stored += state.state2.absmax.numel() * state.state2.absmax.element_size()
    expected = Architecture.from_config_json(path / "config.json").linear_weights * NF4_BYTES_PER_WEIGHT
    assert stored == pytest.approx(expected, rel=0.01)


def test_lora_counts_match_peft(tmp_path):
    path, _ = saved_model(tmp_path, "qwen2")
    arch = Architecture.from_config_json(path / "config.json")
    for targets in (["all-linear"], ["q_proj", "v_proj"]):
        base = load_base_model(
            ModelConfig(name_or_path=str(path)),
            quantize=True,
            dtype=torch.float32,
            device=torch.device("cpu"),
        )
        policy = attach_lora(base, LoraConfig(r=4, target_modules=targets), gradient_checkpointing=True)
        trainable = sum(p.numel() for p in policy.parameters() if p.requires_grad)
        assert arch.lora_weights(4, targets) == trainable


def test_the_memory_settings_the_plan_assumes(tmp_path):
    """nf4 linear weights, the rest of the base in the compute dtype (no fp32 copy), LoRA in
    fp32, gradient checkpointing on by default, paged 8-bit AdamW by default on CUDA."""
    from lora_dpo.config import TrainConfig

    path, _ = saved_model(tmp_path, "llama")
    base = load_base_model(
        ModelConfig(name_or_path=str(path)), quantize=True, dtype=torch.bfloat16, device=torch.device("cpu")
    )
    assert TrainConfig().gradient_checkpointing and TrainConfig().optimizer == "auto"
    policy = attach_lora(base, LoraConfig(), gradient_checkpointing=TrainConfig().gradient_checkpointing)
    base_model = policy.get_base_model()
    assert getattr(base_model, "is_activation_checkpointing", None) or base_model.is_gradient_checkpointing
    for name, param in policy.named_parameters():
        if param.requires_grad:
            assert "lora_" in name and param.dtype == torch.float32, name
        elif param.dtype == torch.uint8:
            assert any(p in name for p in ("_proj",)), name  # nf4: the decoder's linear layers only
        else:
            assert param.dtype == torch.bfloat16, name  # embeddings, norms, LM head
    optim_source = (Path(__file__).resolve().parents[1] / "lora_dpo" / "optim.py").read_text()
    assert '"paged_adamw_8bit" if device.type == "cuda"' in optim_source


def write_model_config(tmp_path: Path, fields: dict) -> Path:
    path = tmp_path / f"{fields['model_type']}-config.json"
    path.write_text(json.dumps(fields))
    return path


@pytest.mark.parametrize("recipe", sorted(RECIPE_MODELS))
def test_the_24gb_recipes_fit(tmp_path, recipe: str):
    config = load_config(CONFIGS / recipe)
    arch = Architecture.from_config_json(write_model_config(tmp_path, RECIPE_MODELS[recipe]))
    plan = estimate(config, arch)
    assert 6 * 2**30 < plan.total < 24 * 2**30, plan.render(24)
    assert "fits a 24 GiB card" in plan.render(24)
    # without checkpointing the same recipe would not fit: the estimate responds to settings
    config.train.gradient_checkpointing = False
    assert estimate(config, arch).total > 24 * 2**30


def test_cli_prints_the_breakdown(tmp_path, capsys):
    model_config = write_model_config(tmp_path, RECIPE_MODELS["llama3.1-8b.yaml"])
    code = main(["plan", "--config", str(CONFIGS / "llama3.1-8b.yaml"), "--model-config", str(model_config)])
    out = capsys.readouterr().out
    assert code == 0
    assert (
        "base weights, linear layers (nf4)" in out and "one logits chunk (512 tokens x 128256 vocab)" in out
    )
    code = main(
        [
            "plan",
            "--config",
            str(CONFIGS / "llama3.1-8b.yaml"),
            "--model-config",
            str(model_config),
            "--gpu-gib",
            "8",
        ]
    )
    assert code == 0 and "does NOT fit a 8 GiB card" in capsys.readouterr().out


def test_cli_without_a_config_json_is_a_clear_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))
    code = main(["plan", "model.name_or_path=someone/not-downloaded-model"])
    assert code == 2
    assert "plan needs its config.json" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="no such config.json"):
        find_model_config(load_config(None, ["model.name_or_path=x"]), str(tmp_path / "missing.json"))


MODEL_CONFIGS = Path(__file__).resolve().parents[1] / "benchmarks" / "model_configs"
LONG_RECIPES = sorted(CONFIGS.glob("*-[48]k.yaml"))


def recipe_arch(recipe: Path) -> Architecture:
    """The model a recipe trains, from the full config.json kept in benchmarks/model_configs."""
    return Architecture.from_config_json(MODEL_CONFIGS / "-".join(recipe.stem.split("-")[:2]) / "config.json")


@pytest.mark.parametrize("recipe", sorted(RECIPE_MODELS))
def test_kept_model_configs_are_the_recipes_models(tmp_path, recipe: str):
    assert recipe_arch(CONFIGS / recipe) == Architecture.from_config_json(
        write_model_config(tmp_path, RECIPE_MODELS[recipe])
    )


@pytest.mark.parametrize("recipe", LONG_RECIPES, ids=lambda p: p.name)
def test_long_context_recipes_fit_and_state_their_plan(recipe: Path):
    config = load_config(recipe)
    arch = recipe_arch(recipe)
    assert config.data.max_length == {"4k": 4096, "8k": 8192}[recipe.stem.split("-")[-1]]
    plan = estimate(config, arch)
    assert "fits a 24 GiB card" in plan.render(24)
    stated = re.search(r"# lora-dpo plan: ([\d.]+) GiB peak", recipe.read_text())
    assert stated and float(stated.group(1)) == pytest.approx(plan.total / 2**30, abs=0.05), (
        "update the comment"
    )
    assert config.train.gradient_accumulation_steps * config.train.per_device_batch_size == 32
    # the 8k recipes keep the layer inputs on the host, 4 to 6 GiB of headroom more
    if config.train.offload_activations:
        assert plan.host_bytes >= arch.num_layers * 2 * config.data.max_length * arch.hidden_size * 2
        config.train.offload_activations = False
        assert estimate(config, arch).total > plan.total + 3 * 2**30


def test_offload_moves_the_layer_inputs_off_the_gpu():
    config = load_config(CONFIGS / "llama3.1-8b-8k.yaml")
    arch = recipe_arch(CONFIGS / "llama3.1-8b-8k.yaml")
    on_host = estimate(config, arch)
    config.train.offload_activations = False
    on_gpu = estimate(config, arch)
    inputs = arch.num_layers * 2 * 8192 * arch.hidden_size * 2
    assert on_gpu.host_bytes == 0 and on_host.host_bytes == inputs
    # one layer's input comes back for its recompute; while the first layer's backward runs, the
    # LoRA gradients of the other layers exist
    gradients = 4 * arch.lora_weights(16, ["all-linear"]) * (arch.num_layers - 1) / arch.num_layers
    expected = inputs * (arch.num_layers - 1) / arch.num_layers - gradients
    assert on_gpu.tensor_bytes - on_host.tensor_bytes == pytest.approx(expected, rel=1e-3)


def test_plan_takes_any_depth_and_batch_and_the_cpu():
    arch = recipe_arch(CONFIGS / "mistral-7b.yaml")
    config = load_config(CONFIGS / "mistral-7b.yaml")
    one, two = (estimate(config, arch.with_layers(n), Workload(2, 512, 256), device="cpu") for n in (1, 2))
    assert not any(item.kind == "cuda" for item in one.items) and one.total == one.tensor_bytes
    layer = sum(a * b for a, b in arch.linear_shapes().values()) * NF4_BYTES_PER_WEIGHT
    assert two.total - one.total > layer  # weights, adapters, optimizer state, one layer input
    cuda = estimate(config, arch.with_layers(1), Workload(2, 512, 256))
    assert cuda.total - cuda.tensor_bytes >= 0.75 * 2**30  # context + allocator reserve
    assert cuda.tensor_bytes < one.tensor_bytes  # CUDA keeps bool dropout masks, the CPU fp32 noise
    assert (
        estimate(config, arch, Workload(2, 512, 256, padded=False)).total
        < estimate(config, arch, Workload(2, 512, 256)).total
    )


def test_the_lora_branch_is_compute_dtype_under_cuda_autocast_and_fp32_on_the_cpu():
    """Per token and LoRA-wrapped linear with `in` inputs: (a + mask)·in + a·r, a = 4 on the
    CPU (peft's fp32 copy) and the compute dtype's 2 under CUDA autocast; the mask is a bool on
    both (CUDA's fused dropout, Dropout16 on the CPU)."""
    arch = recipe_arch(CONFIGS / "mistral-7b.yaml")
    config = load_config(CONFIGS / "mistral-7b.yaml")  # bf16 on CUDA, dropout 0.05, r 16, all-linear
    workload = Workload(2, 512, 256)
    inputs = sum(fan_in for fan_in, _ in arch.linear_shapes().values())
    cpu, cuda = (layer_saved_bytes_per_token(arch, config, workload, device) for device in ("cpu", "cuda"))
    assert cpu - cuda == ((4 + 1) - (2 + 1)) * inputs + (4 - 2) * 16 * 7
    config.model.dtype = "fp32"  # no autocast at fp32: the two devices keep the same bytes
    cpu, cuda = (layer_saved_bytes_per_token(arch, config, workload, device) for device in ("cpu", "cuda"))
    assert cpu == cuda


def test_the_dequantized_moment_holds_the_weight_and_the_gradient_of_its_input():
    """A short batch, where bitsandbytes' backward of the largest 4-bit layer is the moment:
    its dequantized [out, in] weight and the [tokens, in] gradient it makes, at 2 bytes."""
    arch = recipe_arch(CONFIGS / "llama3.1-8b.yaml")
    config = load_config(CONFIGS / "llama3.1-8b.yaml")
    workload = Workload(2, 8, 14)
    tokens, i, h = workload.tokens, arch.intermediate_size, arch.hidden_size
    nf4 = last_layer_backward_bytes(arch, config, workload, "cuda")
    config.model.quantization = "none"  # the same layer without a dequantized moment
    plain = last_layer_backward_bytes(arch, config, workload, "cuda")
    down_lora = (2 + 1) * i + 2 * 2 * h  # dropout output and bool mask, output and its clone
    assert nf4 - plain == 2 * (i * h + tokens * i) - tokens * down_lora
    assert max(a * b for a, b in arch.linear_shapes().values()) == i * h  # the MLP's


def test_ddp_buckets_are_counted_as_lora_dpo_ddp_builds_them():
    """Over more than one rank, DDP's buckets copy the fp32 LoRA gradients, unless
    gradient_as_bucket_view makes the gradients their views; the plan follows lora_dpo.ddp."""
    arch = recipe_arch(CONFIGS / "llama3.1-8b.yaml")
    config = load_config(CONFIGS / "llama3.1-8b.yaml")
    one, two = (estimate(config, arch, ranks=ranks) for ranks in (1, 2))
    ddp_source = (Path(__file__).resolve().parents[1] / "lora_dpo" / "ddp.py").read_text()
    assert DDP_GRADIENT_AS_BUCKET_VIEW == ("gradient_as_bucket_view=True" in ddp_source), (
        "lora_dpo.plan.DDP_GRADIENT_AS_BUCKET_VIEW must say how lora_dpo.ddp builds DistributedDataParallel"
    )
    copy = 0 if DDP_GRADIENT_AS_BUCKET_VIEW else 4 * arch.lora_weights(16, ["all-linear"])
    assert two.total - one.total == pytest.approx(copy)
    assert not any("DDP" in item.name for item in one.items)


def test_find_max_length_is_the_longest_that_fits():
    config = load_config(CONFIGS / "llama3.1-8b.yaml")
    arch = recipe_arch(CONFIGS / "llama3.1-8b.yaml")
    longest = find_max_length(config, arch, 24)
    assert 4096 < longest < 8192
    assert estimate(config, arch, Workload.worst_case(config, longest)).total <= 24 * 2**30
    assert estimate(config, arch, Workload.worst_case(config, longest + 1)).total > 24 * 2**30
    config.train.offload_activations = True
    assert find_max_length(config, arch, 24) > longest
    assert find_max_length(config, arch, 4) == 0


def test_cli_finds_the_max_length(tmp_path, capsys):
    model_config = MODEL_CONFIGS / "llama3.1-8b" / "config.json"
    args = ["plan", "--config", str(CONFIGS / "llama3.1-8b-8k.yaml"), "--model-config", str(model_config)]
    assert main([*args, "--find-max-length"]) == 0
    out = capsys.readouterr().out.strip()
    config = load_config(CONFIGS / "llama3.1-8b-8k.yaml")
    expected = find_max_length(config, Architecture.from_config_json(model_config), 24)
    assert out.startswith(f"longest data.max_length that fits a 24 GiB card: {expected} tokens per sequence")
    assert "1 pair per micro-batch, offload_activations on" in out
    assert main([*args, "--find-max-length", "--gpu-gib", "4"]) == 0
    assert capsys.readouterr().out.startswith("no length fits a 4 GiB card")


def test_a_start_adapter_is_planned_as_the_run_uses_it(tmp_path):
    """continue: the SFT adapter's own rank and targets are what trains (lora.* does not apply);
    stack: lora.* trains and the SFT adapter's fp32 weights are there besides, frozen."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model
    from safetensors.torch import load_file

    path, model = saved_model(tmp_path, "llama")
    adapter = get_peft_model(model, PeftLoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    adapter.save_pretrained(str(tmp_path / "sft"))
    stored = sum(t.numel() for t in load_file(str(tmp_path / "sft" / "adapter_model.safetensors")).values())
    arch = Architecture.from_config_json(path / "config.json")

    def items(*overrides: str) -> dict[str, float]:
        config = load_config(None, [f"model.name_or_path={path}", "lora.r=16", *overrides])
        return {item.name: item.bytes for item in estimate(config, arch).items}

    plain = items()
    cont = items(f"model.adapter_path={tmp_path / 'sft'}", "model.adapter_mode=continue")
    stack = items(f"model.adapter_path={tmp_path / 'sft'}", "model.adapter_mode=stack")
    assert arch.lora_weights(4, ["q_proj", "v_proj"]) == stored  # the count the plan uses is peft's
    assert cont["LoRA weights (fp32)"] == 4 * stored != plain["LoRA weights (fp32)"]
    assert "SFT adapter weights, frozen (fp32)" not in cont
    assert stack["LoRA weights (fp32)"] == plain["LoRA weights (fp32)"]
    assert stack["SFT adapter weights, frozen (fp32)"] == 4 * stored
    assert sum(stack.values()) == pytest.approx(sum(plain.values()) + 4 * stored)
