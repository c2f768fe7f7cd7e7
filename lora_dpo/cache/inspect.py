"""`lora-dpo cache info` and `lora-dpo cache verify`: look inside a reference cache; and the one
way a manifest is shown to people (also in a run's report.md)."""

from __future__ import annotations

from pathlib import Path

import torch

from lora_dpo.cache.format import MANIFEST, SHARD_GLOB, value_problems
from lora_dpo.cache.manifest import Manifest
from lora_dpo.cache.reader import ReferenceCache, load_listed_shard
from lora_dpo.errors import CacheError


def manifest_rows(manifest: Manifest) -> list[tuple[str, str]]:
    """(label, value) rows of what a cache is and what it was built from, hashes in full."""
    reference, model = manifest.reference, manifest.identity.model
    # The tokenization settings are the data rules' to define: shown as they are, the
    # fingerprints among them (`*_sha256`) one per row.
    tokenization = manifest.identity.tokenization
    fingerprints = [(key.replace("_", " "), value or "none") for key, value in tokenization.items() if key.endswith("_sha256")]
    settings = ", ".join(f"{key} {value}" for key, value in tokenization.items() if not key.endswith("_sha256"))
    return [
        ("format", f"{manifest.format} v{manifest.version}"),
        ("created", manifest.created),
        ("reference", f"{reference.mode} ({reference.quantization}, {reference.dtype})"),
        ("model weights sha256", model.weights_sha256),
        ("model config sha256", model.config_sha256 or "none"),
        *fingerprints,
        ("tokenization", settings),
        ("pairs", ", ".join(f"{split} {count}" for split, count in manifest.pairs.items())),
        ("built with", ", ".join(f"{name} {version}" for name, version in manifest.versions.items())),
    ]


def verify_cache(cache_dir: str | Path) -> tuple[list[str], int]:
    """(problems, pairs checked): every listed shard re-read and re-hashed, values finite and
    <= 0, token counts positive, no stray shard files. An empty problem list means a sound cache."""
    cache_dir = Path(cache_dir)
    manifest = Manifest.read(cache_dir)
    problems: list[str] = []
    pairs = 0
    for entry in manifest.shards:
        try:
            records = load_listed_shard(cache_dir, entry)
        except CacheError as exc:
            problems.append(str(exc))
            continue
        pairs += len(records.pair_hashes)
        problems += value_problems(cache_dir / entry.file, records)
    listed = {entry.file for entry in manifest.shards}
    for stray in sorted(p.name for p in cache_dir.glob(SHARD_GLOB)):
        if stray not in listed:
            problems.append(f"{cache_dir / stray}: shard file not listed in {MANIFEST}")
    return problems, pairs


def describe_cache(cache_dir: str | Path) -> str:
    """The manifest in human form, plus statistics of the stored reference log-probs."""
    cache = ReferenceCache(cache_dir, verify_checksums=False)
    manifest = cache.manifest
    size = sum((cache.cache_dir / entry.file).stat().st_size for entry in manifest.shards)
    lines = [f"reference cache {cache_dir}"]
    lines += [f"{label}: {value}" for label, value in manifest_rows(manifest)]
    lines += [
        f"shards: {len(manifest.shards)}, {size / 1e6:.2f} MB, built in {manifest.seconds} s",
        _stats_line("chosen logps", cache.chosen_logps, cache.chosen_tokens),
        _stats_line("rejected logps", cache.rejected_logps, cache.rejected_tokens),
    ]
    for split, report in manifest.data.items():
        dropped = ", ".join(f"{reason} {count}" for reason, count in report.dropped.items()) or "none"
        lines.append(
            f"data ({split}): {report.source}, {report.format} format, {report.total} rows, "
            f"{report.kept} kept, dropped: {dropped}, truncated {report.truncated}"
        )
    return "\n".join(lines)


def _stats_line(name: str, logps: torch.Tensor, tokens: torch.Tensor) -> str:
    per_token = logps / tokens.clamp(min=1)
    return (
        f"{name}: mean {logps.mean():.2f}, min {logps.min():.2f}, max {logps.max():.2f}; "
        f"per token mean {per_token.mean():.3f}; tokens mean {tokens.float().mean():.1f}"
    )
