"""`lora-dpo cache info` and `lora-dpo cache verify`: look inside a reference cache; and the one
way a manifest is shown to people (also in a run's report.md)."""

from __future__ import annotations

from pathlib import Path

import torch

from lora_dpo.cache.format import value_problems
from lora_dpo.cache.manifest import UNPAIRED, Manifest
from lora_dpo.cache.overview import PLOT, PairOverview, write_plot
from lora_dpo.cache.reader import ReferenceCache, load_listed_shard
from lora_dpo.cache.store import unlisted_shards
from lora_dpo.data.unpaired import KL_PAIRING
from lora_dpo.errors import CacheError


def manifest_rows(manifest: Manifest) -> list[tuple[str, str]]:
    """(label, value) rows of what a cache is and what it was built from, hashes in full."""
    reference, model = manifest.reference, manifest.identity.model
    # The tokenization settings are the data rules' to define: shown as they are, the
    # fingerprints among them (`*_sha256`) one per row.
    tokenization = manifest.identity.tokenization
    fingerprints = [
        (key.replace("_", " "), value or "none")
        for key, value in tokenization.items()
        if key.endswith("_sha256")
    ]
    settings = ", ".join(
        f"{key} {value}" for key, value in tokenization.items() if not key.endswith("_sha256")
    )
    last = manifest.history[-1]
    rows = [
        ("format", f"{manifest.format} v{manifest.version}"),
        ("created", manifest.created),
    ]
    if manifest.rows == UNPAIRED:  # KTO's: said only where it is not the usual pairs
        rows.insert(
            1, ("rows", f"unpaired (train.loss_type=kto): completion and KL completion, {KL_PAIRING}")
        )
    if len(manifest.history) > 1:
        rows.append(
            (
                "last change",
                f"{last.at}, {last.what}: {last.added} pairs added ({len(manifest.history)} changes)",
            )
        )
    rows += [
        ("reference", f"{reference.mode} ({reference.quantization}, {reference.dtype})"),
        ("model weights sha256", model.weights_sha256),
        ("model config sha256", model.config_sha256 or "none"),
        ("start adapter sha256", model.adapter_sha256 or "none (the base alone)"),
        *fingerprints,
        ("tokenization", settings),
        ("pairs", ", ".join(f"{split} {count}" for split, count in manifest.pairs.items())),
        *[
            (f"data set {number}", f"{dataset.split}: {dataset.report.source}, {dataset.pairs} pairs")
            for number, dataset in enumerate(manifest.datasets, 1)
        ],
        ("built with", ", ".join(f"{name} {version}" for name, version in last.versions.items())),
    ]
    return rows


def verify_cache(cache_dir: str | Path) -> tuple[list[str], int]:
    """(problems, pairs checked): every listed shard re-read and re-hashed, its fields, shapes
    and pair count as the manifest says, values finite and <= 0, token counts positive. An
    empty problem list means a sound cache. Unlisted shard files are no problem: see
    `unlisted_shards`."""
    cache_dir = Path(cache_dir)
    manifest = Manifest.read(cache_dir)
    problems: list[str] = []
    pairs = 0
    for entry in manifest.shards:
        try:
            records = load_listed_shard(cache_dir, entry, extras=True)
        except CacheError as exc:
            problems.append(str(exc))
            continue
        pairs += len(records.pair_hashes)
        problems += value_problems(cache_dir / entry.file, records)
    return problems, pairs


def describe_cache(cache_dir: str | Path, plot: Path | None = None) -> str:
    """The manifest in human form, statistics of the stored reference log-probs, the reference's
    margins and the response lengths; with `plot`, the same as a figure at that path."""
    cache = ReferenceCache(cache_dir, verify_checksums=False)
    manifest = cache.manifest
    size = sum((cache.cache_dir / entry.file).stat().st_size for entry in manifest.shards)
    lines = [f"reference cache {cache_dir}"]
    lines += [f"{label}: {value}" for label, value in manifest_rows(manifest)]
    lines += [
        f"shards: {len(manifest.shards)}, {size / 1e6:.2f} MB, scored in {sum(c.seconds for c in manifest.history):.1f} s",
        _stats_line("chosen logps", cache.chosen_logps, cache.chosen_tokens),
        _stats_line("rejected logps", cache.rejected_logps, cache.rejected_tokens),
    ]
    overview = PairOverview.of(cache)
    lines += overview.lines()
    for number, dataset in enumerate(manifest.datasets, 1):
        report = dataset.report
        dropped = ", ".join(f"{reason} {count}" for reason, count in report.dropped.items()) or "none"
        lines.append(
            f"data set {number} ({dataset.split}): {report.source}, {report.format} format, {report.total} rows, "
            f"{report.kept} kept, dropped: {dropped}, truncated {report.truncated}"
        )
    for change in manifest.history:
        lines.append(f"change {change.at}: {change.what}, {change.added} pairs added, {change.scored} scored")
    stray = unlisted_shards(cache.cache_dir, manifest)
    if stray:
        lines.append(
            f"unlisted shard files: {len(stray)} (left by an interrupted write; the next write removes them)"
        )
    if plot is not None:
        lines.append(f"plot: {write_plot(overview, plot, f'reference cache {cache_dir}')}")
    return "\n".join(lines)


def default_plot_path(cache_dir: str | Path) -> Path:
    return Path(cache_dir) / PLOT


def _stats_line(name: str, logps: torch.Tensor, tokens: torch.Tensor) -> str:
    per_token = logps / tokens.clamp(min=1)
    return (
        f"{name}: mean {logps.mean():.2f}, min {logps.min():.2f}, max {logps.max():.2f}; "
        f"per token mean {per_token.mean():.3f}; tokens mean {tokens.float().mean():.1f}"
    )
