"""samples.jsonl and samples.md: what the policy and its reference wrote for held-out prompts.

One line of samples.jsonl per prompt and step (`Sample`); samples.md shows them side by side.
Read by `lora-dpo report` (its Samples section and the generation checks), so nothing here
needs torch.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from lora_dpo.fileio import write_text
from lora_dpo.run.directory import SAMPLES_JSONL, SAMPLES_MD
from lora_dpo.tables import markdown_table


@dataclass(frozen=True)
class Sample:
    """One line of samples.jsonl: a held-out prompt, the reference's and the policy's completion."""

    step: int | None  # the policy's optimizer step (None: unknown, e.g. a bare adapter)
    index: int  # the prompt's place among the held-out prompts
    prompt: str
    reference: str
    policy: str
    reference_tokens: int
    policy_tokens: int
    reference_finished: bool
    policy_finished: bool


def samples_jsonl(samples: Sequence[Sample]) -> str:
    return "".join(json.dumps(asdict(s), ensure_ascii=False) + "\n" for s in samples)


def read_samples(path: Path) -> list[Sample]:
    """samples.jsonl back into Samples; unreadable lines are skipped (the report still renders)."""
    samples = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            samples.append(Sample(**json.loads(line)))
        except (json.JSONDecodeError, TypeError):
            continue
    return samples


def latest(samples: Sequence[Sample]) -> list[Sample]:
    """The samples of the latest step (of all, when no step is known)."""
    steps = [s.step for s in samples if s.step is not None]
    return [s for s in samples if s.step == max(steps)] if steps else list(samples)


def repeated_ngram_share(texts: Sequence[str], n: int = 4) -> float:
    """Share of the word n-grams of `texts` that repeat an earlier n-gram of the same text
    (0 when no text has n words): high for degenerate, looping text."""
    total = repeated = 0
    for text in texts:
        words = text.split()
        grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
        total += len(grams)
        repeated += len(grams) - len(set(grams))
    return repeated / total if total else 0.0


def _one_line(text: str) -> str:
    return text.replace("\r", "").replace("\n", "⏎")  # a table cell holds one line


def samples_markdown(samples: Sequence[Sample], limit: int | None = None) -> list[str]:
    """Side by side, per step: prompt, reference, policy (a completion that ran out of tokens
    before a stop token is marked `[cut]`)."""
    lines: list[str] = []
    steps = sorted({s.step for s in samples}, key=lambda step: -1 if step is None else step)
    for step in steps:
        chosen = [s for s in samples if s.step == step][:limit]
        lines += [f"Step {step if step is not None else '?'}:", ""]
        rows = [
            (
                _one_line(s.prompt),
                _one_line(s.reference) + ("" if s.reference_finished else " [cut]"),
                _one_line(s.policy) + ("" if s.policy_finished else " [cut]"),
            )
            for s in chosen
        ]
        lines += markdown_table(("prompt", "reference", "policy"), rows) + [""]
    return lines


def write_samples(out_dir: Path, samples: Sequence[Sample]) -> tuple[Path, Path]:
    """samples.jsonl and samples.md in `out_dir` (each replaced whole)."""
    jsonl, markdown = Path(out_dir) / SAMPLES_JSONL, Path(out_dir) / SAMPLES_MD
    write_text(jsonl, samples_jsonl(samples))
    header = [
        "# Samples",
        "",
        "Held-out prompts; the reference is the base (with its start adapter, if the run began from one).",
        "",
    ]
    write_text(markdown, "\n".join(header + samples_markdown(samples)).rstrip() + "\n")
    return jsonl, markdown
