"""Adapters as eval and merge read them: a run directory, its adapter/ or any PEFT LoRA
directory; damaged files and adapters trained on another base are one line, before any model
load. Real tiny models of two widths and architectures, real PEFT adapters saved for each."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM

from lora_dpo.adapters import BaseShapes, LoraFactors, check_fits, read_adapter, shapes_from_files, shapes_of
from lora_dpo.cli import main
from lora_dpo.config import ModelConfig, dump_config
from lora_dpo.demo import demo_config
from lora_dpo.demo.models import build_tiny_model, tiny_config
from lora_dpo.errors import ConfigError
from lora_dpo.evaluate import evaluate_run
from lora_dpo.merge import find_adapter
from lora_dpo.model import load_adapter, load_base_model
from precompute import precompute_reference

CPU = torch.device("cpu")
Q_PROJ = "model.layers.0.self_attn.q_proj"


def save_adapter(base_dir: Path, out: Path, tokenizer=None, targets=("q_proj", "v_proj"), **options) -> Path:
    """A real PEFT LoRA adapter of `base_dir` (non-zero B, so it changes the model), saved as
    peft saves it; with `tokenizer` beside it, as a train run saves its adapter."""
    model = AutoModelForCausalLM.from_pretrained(str(base_dir))  # records base_model_name_or_path
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=list(targets), **options))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.2)
    peft_model.save_pretrained(str(out))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def world(demo_workdir, tiny_tokenizer, tmp_path_factory):
    """Bases: the demo's tiny Llama (hidden 64), a copy of it elsewhere, a tiny Qwen2 (hidden
    32), a one-layer Llama and a Llama with a smaller vocabulary (both hidden 64). Adapters: a
    train-run layout for the Llama (RUN/config.yaml, RUN/adapter with its tokenizer) and a bare
    one for the Qwen2."""
    root = tmp_path_factory.mktemp("adapters")
    llama = demo_workdir / "model"
    copy = Path(shutil.copytree(llama, root / "llama-copy"))
    qwen = build_tiny_model(root / "qwen2-32", tiny_tokenizer, "qwen2", hidden_size=32)
    one_layer = build_tiny_model(
        root / "llama-1-layer", tiny_tokenizer, "llama", hidden_size=64, num_layers=1
    )
    small_vocab = root / "llama-small-vocab"
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(
        tiny_config("llama", vocab_size=len(tiny_tokenizer) - 16, hidden_size=64)
    ).save_pretrained(str(small_vocab))
    tiny_tokenizer.save_pretrained(str(small_vocab))

    config = demo_config(demo_workdir)
    config.data.max_pairs = 16
    config.precompute.cache_dir = str(root / "cache")
    run = root / "run"
    save_adapter(llama, run / "adapter", tiny_tokenizer)
    (run / "config.yaml").write_text(dump_config(config))
    qwen_adapter = save_adapter(qwen, root / "qwen-adapter")
    precompute_reference(config)
    return SimpleNamespace(
        root=root,
        llama=llama,
        copy=copy,
        qwen=qwen,
        one_layer=one_layer,
        small_vocab=small_vocab,
        config=config,
        run=run,
        qwen_adapter=qwen_adapter,
    )


@pytest.fixture
def no_model_load(monkeypatch):
    """Any model load fails the test: what is checked here is checked before one."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", refuse)


@pytest.fixture(autouse=True)
def no_load_bars():
    """In-process, `--quiet` comes after tqdm read its environment: silence transformers' bar."""
    from transformers.utils import logging

    logging.disable_progress_bar()
    yield
    logging.enable_progress_bar()


def config_args(world, base: Path | None = None) -> list[str]:
    """The fixture's config as eval reads it from the command line (the run's config.yaml)."""
    return [
        "--config",
        str(world.run / "config.yaml"),
        f"model.name_or_path={base or world.llama}",
        "--quiet",
    ]


def header_shapes(model_dir: Path) -> BaseShapes:
    shapes = shapes_from_files(model_dir)
    assert shapes is not None, f"{model_dir}: shapes not readable from its files"
    return shapes


def model_config(path: Path) -> ModelConfig:
    return ModelConfig(name_or_path=str(path))


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0].removeprefix("error: ")


# ----------------------------------------------------------------------------- where the adapter is


def test_a_run_its_adapter_and_a_bare_adapter_directory_resolve(world):
    assert read_adapter(world.run).directory == world.run / "adapter"
    assert read_adapter(world.run / "adapter").directory == world.run / "adapter"
    assert read_adapter(world.qwen_adapter).directory == world.qwen_adapter
    llama = read_adapter(world.run)
    assert llama.recorded_base == str(world.llama)
    assert llama.factors[Q_PROJ] == LoraFactors(a=[4, 64], b=[64, 4], embedding=False)
    assert read_adapter(world.qwen_adapter).factors[Q_PROJ].a == [4, 32]
    assert len(llama.factors) == 4  # q_proj and v_proj of two layers
    assert llama.tokenizer_size == 384 and read_adapter(world.qwen_adapter).tokenizer_size is None


def test_eval_takes_a_run_directory_like_merge(world):
    """`eval --adapter RUN` evaluates RUN/adapter; the adapter really is applied."""
    via_run = evaluate_run(world.config, str(world.run)).to_dict()
    via_adapter = evaluate_run(world.config, str(world.run / "adapter")).to_dict()
    bare = evaluate_run(world.config, None).to_dict()
    assert via_run == via_adapter
    assert abs(via_run["eval/logratio/chosen"] - bare["eval/logratio/chosen"]) > 1e-3
    assert find_adapter(world.run).adapter_dir == world.run / "adapter"


# ----------------------------------------------------------------------------- damaged adapter files


DAMAGE: dict[str, tuple[Callable[[Path], Path], str]] = {}  # name -> (damage a copy, what the line says)


def damage(name: str, message: str) -> Callable[[Callable[[Path], Path]], Callable[[Path], Path]]:
    """Register `make(adapter) -> the path given to --adapter` under `name`."""

    def register(make: Callable[[Path], Path]) -> Callable[[Path], Path]:
        DAMAGE[name] = (make, message)
        return make

    return register


def _cut(path: Path, keep: float) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _with_factors(adapter: Path, tensors: dict[str, torch.Tensor]) -> Path:
    save_file(tensors, str(adapter / "adapter_model.safetensors"))
    return adapter


@damage("missing path", "no such directory")
def _missing(adapter: Path) -> Path:
    return adapter / "nowhere"


@damage("a file", "a file, not an adapter directory")
def _a_file(adapter: Path) -> Path:
    return adapter / "adapter_model.safetensors"


@damage("empty directory", "no adapter_config.json there or in")
def _empty(adapter: Path) -> Path:
    shutil.rmtree(adapter)
    adapter.mkdir()
    return adapter


@damage("run without adapter", "a train run directory with no adapter_config.json")
def _run_without_adapter(adapter: Path) -> Path:
    run = adapter.parent / "run"
    run.mkdir()
    (run / "config.yaml").write_text("train: {}\n")
    return run


@damage("config cut short", "adapter_config.json: not valid JSON")
def _config_cut(adapter: Path) -> Path:
    _cut(adapter / "adapter_config.json", 0.5)
    return adapter


@damage("config binary", "adapter_config.json: not UTF-8")
def _config_binary(adapter: Path) -> Path:
    (adapter / "adapter_config.json").write_bytes(b"\x89PNG\r\n\x1a\n\xff")
    return adapter


@damage("config a list", "adapter_config.json: expected a JSON object, got list")
def _config_list(adapter: Path) -> Path:
    (adapter / "adapter_config.json").write_text("[1, 2]")
    return adapter


@damage("config unreadable", "adapter_config.json: cannot be read")
def _config_unreadable(adapter: Path) -> Path:
    (adapter / "adapter_config.json").unlink()
    (adapter / "adapter_config.json").mkdir()  # unreadable as a file, even for root
    return adapter


@damage("not LoRA", "peft_type='IA3'; only LoRA adapters are supported")
def _not_lora(adapter: Path) -> Path:
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "IA3"}))
    return adapter


@damage("no weights", "no adapter_model.safetensors")
def _no_weights(adapter: Path) -> Path:
    (adapter / "adapter_model.safetensors").unlink()
    return adapter


@damage("bin weights", "an adapter_model.bin is not read")
def _bin_weights(adapter: Path) -> Path:
    (adapter / "adapter_model.safetensors").rename(adapter / "adapter_model.bin")
    return adapter


@damage("weights cut short", "adapter_model.safetensors: not a complete safetensors file")
def _weights_cut(adapter: Path) -> Path:
    _cut(adapter / "adapter_model.safetensors", 0.75)
    return adapter


@damage("weights header cut", "the file is truncated or damaged")
def _weights_header_cut(adapter: Path) -> Path:
    _cut(adapter / "adapter_model.safetensors", 0.02)
    return adapter


@damage("weights empty", "adapter_model.safetensors: not a complete safetensors file")
def _weights_empty(adapter: Path) -> Path:
    (adapter / "adapter_model.safetensors").write_bytes(b"")
    return adapter


@damage("weights without LoRA", "holds no LoRA tensors")
def _no_lora_tensors(adapter: Path) -> Path:
    return _with_factors(adapter, {"x.weight": torch.zeros(2, 2)})


@damage("lora_B missing", f"{Q_PROJ} has no lora_B tensor")
def _no_lora_b(adapter: Path) -> Path:
    return _with_factors(adapter, {f"base_model.model.{Q_PROJ}.lora_A.weight": torch.zeros(4, 64)})


@damage("ranks disagree", "their ranks do not agree")
def _ranks_disagree(adapter: Path) -> Path:
    return _with_factors(
        adapter,
        {
            f"base_model.model.{Q_PROJ}.lora_A.weight": torch.zeros(4, 64),
            f"base_model.model.{Q_PROJ}.lora_B.weight": torch.zeros(64, 8),
        },
    )


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_adapter_is_one_line_naming_it_before_any_load(
    damage, world, tmp_path, capsys, no_model_load
):
    make, message = DAMAGE[damage]
    adapter = Path(shutil.copytree(world.run / "adapter", tmp_path / "adapter"))
    given = make(adapter)
    with pytest.raises(ConfigError) as caught:
        read_adapter(given)
    text = str(caught.value)
    assert message in text and "\n" not in text, text
    assert str(given) in text or str(adapter / "adapter_config.json") in text or str(adapter) in text, text
    # Both verbs say the same, before the model (here: one that does not exist) is touched.
    assert main(["eval", "--adapter", str(given), "model.name_or_path=/nonexistent/model"]) == 2
    assert one_error_line(capsys) == text
    assert main(["merge", "--adapter", str(given), "--out", str(tmp_path / "merged")]) == 2
    assert one_error_line(capsys) == text
    assert not (tmp_path / "merged").exists()


# ----------------------------------------------------------------------------- another base


def test_eval_refuses_an_adapter_trained_on_another_base(world, capsys, no_model_load):
    adapter = world.qwen_adapter
    assert main(["eval", "--adapter", str(adapter), *config_args(world)]) == 2
    assert one_error_line(capsys) == (
        f"{adapter}: trained on '{world.qwen}' (adapter_config.json base_model_name_or_path), this run's "
        f"base is '{world.llama}'; pass --base {world.llama} to use it anyway (shapes are checked)"
    )


def test_base_does_not_excuse_shapes_that_do_not_fit(world, tmp_path, capsys, no_model_load):
    """--base accepts a foreign adapter only if every LoRA factor fits: the first mismatch,
    read from the base's safetensors headers before any load, is the error, for eval and merge."""
    qwen_on_llama = (
        f"{world.qwen_adapter}: does not fit the base '{world.llama}': lora_A of {Q_PROJ} is "
        "[4, 32], the base's q_proj takes 64 inputs"
    )
    assert (
        main(["eval", "--adapter", str(world.qwen_adapter), "--base", str(world.llama), *config_args(world)])
        == 2
    )
    assert one_error_line(capsys) == qwen_on_llama
    assert (
        main(
            [
                "merge",
                "--adapter",
                str(world.qwen_adapter),
                "--base",
                str(world.llama),
                "--out",
                str(tmp_path / "merged"),
            ]
        )
        == 2
    )
    assert one_error_line(capsys) == qwen_on_llama
    assert (
        main(
            [
                "merge",
                "--adapter",
                str(world.run),
                "--base",
                str(world.qwen),
                "--out",
                str(tmp_path / "merged"),
            ]
        )
        == 2
    )
    assert one_error_line(capsys) == (
        f"{world.run / 'adapter'}: does not fit the base '{world.qwen}': lora_A of "
        f"{Q_PROJ} is [4, 64], the base's q_proj takes 32 inputs"
    )
    assert not (tmp_path / "merged").exists()


def test_the_saved_tokenizer_must_fit_the_base_vocabulary(world, tmp_path, capsys, no_model_load):
    """Same widths, fewer embedding rows than the tokenizer saved with the adapter has tokens."""
    expected = (
        f"{world.run / 'adapter'}: does not fit the base '{world.small_vocab}': the tokenizer saved with "
        "the adapter has 384 tokens, the base's embedding has 368 rows"
    )
    assert (
        main(
            [
                "merge",
                "--adapter",
                str(world.run),
                "--base",
                str(world.small_vocab),
                "--out",
                str(tmp_path / "merged"),
            ]
        )
        == 2
    )
    assert one_error_line(capsys) == expected
    assert (
        main(["eval", "--adapter", str(world.run), "--base", str(world.small_vocab), *config_args(world)])
        == 2
    )
    assert one_error_line(capsys) == expected


def test_a_foreign_adapter_that_fits_is_used_with_base(world, capsys):
    """The same Llama at another path: refused by name without --base, evaluated with it, with
    the values the adapter gives on the original path."""
    assert main(["eval", "--adapter", str(world.run), *config_args(world, world.copy)]) == 2
    assert f"pass --base {world.copy} to use it anyway" in one_error_line(capsys)
    expected = evaluate_run(world.config, str(world.run)).to_dict()
    assert main(["eval", "--adapter", str(world.run), "--base", str(world.copy), *config_args(world)]) == 0
    printed = dict(line.split(": ") for line in capsys.readouterr().out.splitlines())
    assert printed == {key: f"{value:.4f}" for key, value in expected.items()}


def test_shapes_are_checked_on_the_loaded_modules_too(world):
    """Where headers cannot tell (a 4-bit base: packed storage; a layer the checkpoint does not
    list), `load_adapter` compares the factors with the loaded modules before peft sees them."""
    qwen_4bit = load_base_model(model_config(world.qwen), quantize=True, dtype=torch.float32, device=CPU)
    with pytest.raises(
        ConfigError, match=rf"lora_A of {Q_PROJ} is \[4, 64\], the base's q_proj takes 32 inputs$"
    ):
        load_adapter(qwen_4bit, world.run)
    one_layer = load_base_model(
        model_config(world.one_layer), quantize=False, dtype=torch.float32, device=CPU
    )
    check_fits(read_adapter(world.run), header_shapes(world.one_layer), str(world.one_layer))  # layer 0 fits
    with pytest.raises(
        ConfigError, match=r"adapts model.layers.1.self_attn.(q|v)_proj, which the base .* does not have$"
    ):
        load_adapter(one_layer, world.run)
    fitting = load_adapter(
        load_base_model(model_config(world.llama), quantize=True, dtype=torch.float32, device=CPU), world.run
    )
    assert sum("lora_A" in name for name, _ in fitting.named_parameters()) == 4


def test_merge_through_a_base_with_a_missing_layer_is_one_line(world, tmp_path, capsys):
    assert (
        main(
            [
                "merge",
                "--adapter",
                str(world.run),
                "--base",
                str(world.one_layer),
                "--dtype",
                "fp32",
                "--out",
                str(tmp_path / "merged"),
                "--quiet",
            ]
        )
        == 2
    )
    assert "adapts model.layers.1.self_attn." in one_error_line(capsys)
    assert not (tmp_path / "merged").exists()


# ----------------------------------------------------------------------------- what merge cannot fold


@pytest.mark.parametrize(
    "options, message",
    [
        ({"use_dora": True}, "a DoRA adapter (use_dora) cannot be merged here; plain LoRA only"),
        ({"lora_bias": True}, "adapters with lora_bias cannot be merged here"),
    ],
)
def test_merge_refuses_what_it_cannot_fold_before_any_load_and_eval_takes_it(
    options, message, world, tmp_path, capsys
):
    adapter = save_adapter(world.llama, tmp_path / "adapter", **options)
    assert read_adapter(adapter).factors[Q_PROJ].a == [4, 64]  # a sound adapter, for eval
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(
            AutoModelForCausalLM, "from_pretrained", lambda *a, **k: pytest.fail("a model was loaded")
        )
        assert main(["merge", "--adapter", str(adapter), "--out", str(tmp_path / "merged")]) == 2
    assert one_error_line(capsys) == f"{adapter / 'adapter_config.json'}: {message}"
    assert evaluate_run(world.config, str(adapter)).pairs == 16  # eval runs it through peft's own forward


def test_conv1d_adapters_fit_their_base_and_merge_refuses_them(world, tiny_tokenizer, tmp_path, capsys):
    """GPT-2 stores its projections as Conv1D [in, out] (fan_in_fan_out): the checks read the
    factors the other way round and find a correct adapter fitting, from files and loaded."""
    config = AutoConfig.for_model(
        "gpt2", vocab_size=len(tiny_tokenizer), n_embd=32, n_layer=1, n_head=2, n_positions=64
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(str(tmp_path / "gpt2"))
    adapter = read_adapter(
        save_adapter(tmp_path / "gpt2", tmp_path / "adapter", targets=("c_attn",), fan_in_fan_out=True)
    )
    assert adapter.factors["transformer.h.0.attn.c_attn"] == LoraFactors(a=[4, 32], b=[96, 4])
    check_fits(adapter, header_shapes(tmp_path / "gpt2"), "gpt2")
    check_fits(adapter, shapes_of(AutoModelForCausalLM.from_pretrained(str(tmp_path / "gpt2"))), "gpt2")
    assert main(["merge", "--adapter", str(adapter.directory), "--out", str(tmp_path / "merged")]) == 2
    assert "fan_in_fan_out adapters (Conv1D bases) cannot be merged here" in one_error_line(capsys)


def test_embedding_adapters_fit_and_merge_refuses_them(world, tmp_path, capsys):
    """An Embedding stores [num, dim]; its factors are lora_embedding_A [r, num] and
    lora_embedding_B [dim, r]: they fit, and merge (linear layers only) refuses them."""
    adapter = read_adapter(save_adapter(world.llama, tmp_path / "adapter", targets=("embed_tokens",)))
    assert adapter.factors["model.embed_tokens"] == LoraFactors(a=[4, 384], b=[64, 4], embedding=True)
    check_fits(adapter, header_shapes(world.llama), "llama")
    check_fits(adapter, shapes_of(AutoModelForCausalLM.from_pretrained(str(world.llama))), "llama")
    with pytest.raises(ConfigError, match=r"the base's embed_tokens takes 368 inputs$"):
        check_fits(adapter, header_shapes(world.small_vocab), "small")
    assert main(["merge", "--adapter", str(adapter.directory), "--out", str(tmp_path / "merged")]) == 2
    assert (
        "adapts embedding layers (model.embed_tokens); only linear layers can be merged here"
        in one_error_line(capsys)
    )
