"""What the model writes: completions of held-out prompts from the policy and the reference.

Reward accuracy and margins say the policy moved, not what it now writes; the classic DPO
failure (margins rising while outputs degrade) shows first in generations. The reference is
the policy's own base with the adapter disabled (peft's `disable_adapter()`), or base + the
start adapter for a run that began from one (`adapter_start.as_reference`), so the base is
loaded once for both.

Rules:
- prompts are the eval split's, in the data's order, each prompt once, tokenized exactly as
  training tokenizes them (the prompt ids of each TokenizedPair);
- batches are left-padded, and the attention mask comes from the prompt lengths, never from
  `!= pad_id` (pad is often eos); transformers derives the position ids from that mask, so a
  padded prompt sees positions 0.. as it would alone;
- generation stops at the tokenizer's EOS and, for conversational data, at the chat
  template's end-of-turn token; a completion is cut after its first stop token, and
  `finished` says whether it reached one within max_new_tokens;
- greedy by default; sampling draws from its own seeded RNG (the caller's RNG state is left
  as it was, so sampling during training does not change training's dropout or data order).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lora_dpo.adapter_start import as_reference
from lora_dpo.batching import pad_id_of
from lora_dpo.config import Config
from lora_dpo.data import TokenizedPair
from lora_dpo.errors import ConfigError
from lora_dpo.run.directory import RunDirectory
from lora_dpo.samples import Sample, write_samples

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GenerationSettings:
    max_new_tokens: int = 128
    sample: bool = False  # False: greedy
    temperature: float = 1.0  # sampling only
    top_p: float = 1.0  # sampling only
    seed: int = 0  # sampling only
    batch_size: int = 8  # prompts per generate call


@dataclass(frozen=True)
class Completion:
    ids: tuple[int, ...]  # the generated tokens, through the first stop token when finished
    text: str  # ids decoded without special tokens
    finished: bool  # reached a stop token within max_new_tokens


def cli_settings(
    *,
    max_new_tokens: int,
    sample: bool,
    seed: int | None,
    temperature: float | None,
    top_p: float | None,
    batch_size: int,
) -> GenerationSettings:
    """`lora-dpo generate`'s flags, checked: the sampling flags need --sample."""
    sampling = {"--seed": seed, "--temperature": temperature, "--top-p": top_p}
    given = [flag for flag, value in sampling.items() if value is not None]
    if given and not sample:
        raise ConfigError(
            f"{', '.join(given)}: a sampling setting, and --sample is not given (greedy decoding draws nothing)"
        )
    settings = GenerationSettings(
        max_new_tokens,
        sample,
        1.0 if temperature is None else temperature,
        1.0 if top_p is None else top_p,
        0 if seed is None else seed,
        batch_size,
    )
    for flag, value in (("--max-new-tokens", max_new_tokens), ("--batch-size", batch_size)):
        if value < 1:
            raise ConfigError(f"{flag} {value}: must be >= 1")
    if not settings.temperature > 0:
        raise ConfigError(f"--temperature {settings.temperature}: must be > 0")
    if not 0 < settings.top_p <= 1:
        raise ConfigError(f"--top-p {settings.top_p}: must be in (0, 1]")
    return settings


def held_out_prompts(pairs: Sequence[TokenizedPair], count: int) -> list[tuple[int, ...]]:
    """The first `count` distinct prompts of `pairs`, in the data's order."""
    seen: dict[tuple[int, ...], None] = {}
    for pair in pairs:
        if len(seen) == count:
            break
        seen.setdefault(pair.prompt_ids, None)
    return list(seen)


def stop_token_ids(tokenizer: Any, conversational: bool) -> list[int]:
    """EOS, and for chat data the token the chat template closes an assistant turn with
    (`<|im_end|>`, `<|eot_id|>`, ...) when it is one token other than EOS."""
    stops = [int(tokenizer.eos_token_id)]
    if conversational:
        from lora_dpo.data.formats import _ChatRenderer  # the one place that knows the template's turns

        end = _ChatRenderer(tokenizer).learn_end_of_turn([{"role": "user", "content": "Hi"}]).strip()
        ids = tokenizer(end, add_special_tokens=False)["input_ids"] if end else []
        if len(ids) == 1 and ids[0] not in stops:
            stops.append(int(ids[0]))
        elif len(ids) > 1:
            log.warning(
                "the chat template's end of turn %r is %d tokens: generation stops at EOS only", end, len(ids)
            )
    return stops


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), each [B, W]: prompts right-aligned, mask 1 on real tokens
    (from the lengths: a prompt may itself hold the pad id)."""
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
        attention_mask[row, width - len(prompt) :] = 1
    return input_ids, attention_mask


def cut_at_stop(ids: Sequence[int], stops: Sequence[int]) -> tuple[tuple[int, ...], bool]:
    """(ids through the first stop token, whether there was one)."""
    for at, token in enumerate(ids):
        if token in stops:
            return tuple(ids[: at + 1]), True
    return tuple(ids), False


def generation_config(settings: GenerationSettings, stops: Sequence[int], pad_id: int) -> Any:
    """Every knob set explicitly: a model's own generation_config.json (top_k, a repetition
    penalty, sampling on) fills only what is left unset."""
    from transformers import GenerationConfig

    return GenerationConfig(
        do_sample=settings.sample,
        max_new_tokens=settings.max_new_tokens,
        eos_token_id=list(stops),
        pad_token_id=pad_id,
        num_beams=1,
        temperature=settings.temperature if settings.sample else 1.0,
        top_p=settings.top_p if settings.sample else 1.0,
        top_k=0,  # off: top_p alone decides
        repetition_penalty=1.0,
        use_cache=True,
    )


@contextmanager
def plain_attention(model: Any) -> Iterator[None]:
    """The model's own attention while it generates: a packed training layout switches it to
    a backend that runs packed batches only (lora_dpo.attention); switched back afterwards."""
    from lora_dpo.attention import FLEX, base_model, restore_unpacked_attention, text_config

    before = text_config(model)._attn_implementation
    restore_unpacked_attention(model)  # pair by pair -> the eager or sdpa it wraps
    if before == FLEX:
        base_model(model).set_attn_implementation("sdpa")
    try:
        yield
    finally:
        if text_config(model)._attn_implementation != before:
            base_model(model).set_attn_implementation(before)


@torch.no_grad()
def generate_completions(
    model: Any,  # a transformers causal LM, or a peft model around one
    tokenizer: Any,
    prompts: Sequence[Sequence[int]],
    settings: GenerationSettings,
    stops: Sequence[int],
    pad_id: int,
    device: torch.device,
) -> list[Completion]:
    """One completion per prompt, in order, `settings.batch_size` prompts per batch."""
    config = generation_config(settings, stops, pad_id)
    was_training = model.training
    model.eval()  # no LoRA dropout
    devices = [device] if device.type == "cuda" else []
    completions: list[Completion] = []
    with torch.random.fork_rng(devices=devices, enabled=settings.sample), plain_attention(model):
        if settings.sample:
            torch.manual_seed(settings.seed)
        for start in range(0, len(prompts), settings.batch_size):
            input_ids, attention_mask = left_pad(prompts[start : start + settings.batch_size], pad_id)
            out = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                generation_config=config,
            )  # [b, W + new]
            for row in out[:, input_ids.shape[1] :].tolist():
                ids, finished = cut_at_stop(row, stops)
                text = tokenizer.decode(ids, skip_special_tokens=True)
                completions.append(Completion(ids, text, finished))
    model.train(was_training)
    return completions


def make_samples(
    step: int | None,
    tokenizer: Any,
    prompts: Sequence[Sequence[int]],
    reference: Sequence[Completion],
    policy: Sequence[Completion],
) -> list[Sample]:
    return [
        Sample(
            step,
            index,
            tokenizer.decode(list(prompt), skip_special_tokens=True),
            ref.text,
            pol.text,
            len(ref.ids),
            len(pol.ids),
            ref.finished,
            pol.finished,
        )
        for index, (prompt, ref, pol) in enumerate(zip(prompts, reference, policy, strict=True))
    ]


class HeldOut:
    """Completions of fixed held-out prompts by a peft policy, and by its reference (the
    adapter disabled, or only the start adapter active), which never changes: computed once.
    `lora-dpo generate`, the demo, training's samples (`train.generate_every`) and the win-rate
    judge (`train.reward_model`) all generate through one."""

    def __init__(
        self,
        tokenizer: Any,
        prompts: Sequence[Sequence[int]],
        settings: GenerationSettings,
        stops: Sequence[int],
        pad_id: int,
        device: torch.device,
    ):
        self.tokenizer, self.prompts, self.settings = tokenizer, [tuple(p) for p in prompts], settings
        self.stops, self.pad_id, self.device = list(stops), pad_id, device
        self.prompt_texts = [tokenizer.decode(list(p), skip_special_tokens=True) for p in self.prompts]
        self._reference: list[Completion] | None = None

    @classmethod
    def from_config(
        cls,
        config: Config,
        tokenizer: Any,
        eval_pairs: Sequence[TokenizedPair],
        conversational: bool,
        device: torch.device,
    ) -> HeldOut:
        """The first `train.generate_prompts` distinct held-out prompts, up to
        `train.generate_max_new_tokens` tokens each."""
        cfg = config.train
        return cls(
            tokenizer,
            held_out_prompts(eval_pairs, cfg.generate_prompts),
            GenerationSettings(max_new_tokens=cfg.generate_max_new_tokens),
            stop_token_ids(tokenizer, conversational),
            pad_id_of(tokenizer),
            device,
        )

    def completions(self, model: Any) -> list[Completion]:
        return generate_completions(
            model, self.tokenizer, self.prompts, self.settings, self.stops, self.pad_id, self.device
        )

    def reference(self, policy: Any) -> list[Completion]:
        if self._reference is None:
            with as_reference(policy):
                self._reference = self.completions(policy)
        return self._reference

    def samples(self, policy: Any, step: int | None) -> list[Sample]:
        """One Sample per prompt: the reference's completion beside the policy's at `step`."""
        return make_samples(
            step, self.tokenizer, self.prompts, self.reference(policy), self.completions(policy)
        )


# ----------------------------------------------------------------------------- lora-dpo generate


def run_dir_of(adapter_dir: Path) -> Path:
    """The run an adapter belongs to (RUN for RUN/adapter), else the adapter directory itself."""
    run = RunDirectory(adapter_dir.parent)
    return run.path if run.adapter_dir == adapter_dir and run.config_path.is_file() else adapter_dir


def final_step(run_dir: Path) -> int | None:
    """The last optimizer step in the run's metrics.jsonl (None without one)."""
    from lora_dpo.report import read_metrics

    path = RunDirectory(run_dir).metrics_path
    records = read_metrics(path).train if path.is_file() else []
    return int(records[-1]["step"]) if records else None


def generate_run(
    config: Config,
    adapter: str | Path,
    *,
    prompts: int,
    settings: GenerationSettings,
    out: str | Path | None = None,
) -> tuple[list[Sample], Path]:
    """`lora-dpo generate`: the policy of `adapter` and its reference on the first `prompts`
    held-out prompts; samples.jsonl and samples.md go to the run directory (or `out`)."""
    from lora_dpo.adapters import read_adapter
    from lora_dpo.cache import policy_precision
    from lora_dpo.data import load_preference_data
    from lora_dpo.losses import LossSettings
    from lora_dpo.model import (
        check_adapter_base,
        default_device,
        load_adapter,
        load_base_at,
        load_tokenizer,
    )

    if not config.data.eval_path:
        raise ConfigError("data.eval_path is not set: generate completes the held-out prompts")
    checked = read_adapter(adapter)  # RUN or RUN/adapter; its files are checked before any load
    check_adapter_base(checked, config.model, explicit_base=False)
    device = default_device()
    precision = policy_precision(config, device)
    tokenizer = load_tokenizer(config.model)
    unpaired = LossSettings.of(config.train).unpaired  # KTO's rows have prompts too
    pairs, report = load_preference_data(config.data, tokenizer, "eval", unpaired=unpaired)
    prompt_ids = held_out_prompts(pairs, prompts)
    base = load_base_at(config.model, precision, device)
    policy = load_adapter(base, checked)
    stops = stop_token_ids(tokenizer, report.conversational)
    held_out = HeldOut(tokenizer, prompt_ids, settings, stops, pad_id_of(tokenizer), device)
    run_dir = run_dir_of(checked.directory)
    samples = held_out.samples(policy, final_step(run_dir))
    out_dir = Path(out) if out is not None else run_dir
    jsonl, markdown = write_samples(out_dir, samples)
    log.info("samples: %s, %s", jsonl, markdown)
    return samples, out_dir
