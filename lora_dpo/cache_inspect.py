"""`lora-dpo cache info` and `lora-dpo cache verify`: look inside a reference cache."""

from __future__ import annotations

from pathlib import Path

import torch

from lora_dpo.cache import MANIFEST, load_listed_shard, read_manifest
from lora_dpo.errors import CacheError


def verify_cache(cache_dir: str | Path) -> tuple[list[str], int]:
    """(problems, pairs checked): every listed shard re-read and re-hashed, values finite,
    token counts positive, no stray shard files. An empty problem list means a sound cache."""
    cache_dir = Path(cache_dir)
    manifest = read_manifest(cache_dir)
    problems, pairs = [], 0
    for entry in manifest["shards"]:
        try:
            records = load_listed_shard(cache_dir, entry)
        except CacheError as exc:
            problems.append(str(exc))
            continue
        pairs += len(records.pair_hashes)
        name = cache_dir / entry["file"]
        for key in ("chosen_logps", "rejected_logps"):
            values = getattr(records, key)
            if not torch.isfinite(values).all():
                problems.append(f"{name}: {key} holds non-finite values")
            if (values > 0).any():
                problems.append(f"{name}: {key} holds positive log-probs")
        for key in ("chosen_tokens", "rejected_tokens"):
            if (getattr(records, key) <= 0).any():
                problems.append(f"{name}: {key} holds counts <= 0")
    listed = {entry["file"] for entry in manifest["shards"]}
    for stray in sorted(p.name for p in cache_dir.glob("shard-*.safetensors")):
        if stray not in listed:
            problems.append(f"{cache_dir / stray}: shard file not listed in {MANIFEST}")
    return problems, pairs


def describe_cache(cache_dir: str | Path) -> str:
    """The manifest in human form, plus statistics of the stored reference log-probs."""
    from lora_dpo.cache import ReferenceCache

    cache = ReferenceCache(cache_dir, verify_checksums=False)
    manifest = cache.manifest
    identity, reference = manifest["identity"], manifest["reference"]
    tokenization = identity["tokenization"]
    size = sum((Path(cache_dir) / s["file"]).stat().st_size for s in manifest["shards"])
    lines = [
        f"reference cache {cache_dir} (format v{manifest['version']}, created {manifest['created']})",
        "pairs: " + ", ".join(f"{split} {count}" for split, count in manifest["pairs"].items()),
        f"shards: {len(manifest['shards'])}, {size / 1e6:.2f} MB",
        f"reference: {reference['mode']} ({reference['quantization']}, {reference['dtype']})",
        f"model: weights sha256 {identity['model']['weights_sha256'][:16]}..., "
        f"config sha256 {str(identity['model']['config_sha256'])[:16]}...",
        f"tokenizer: sha256 {tokenization['tokenizer_sha256'][:16]}..., chat template "
        + (f"sha256 {tokenization['chat_template_sha256'][:16]}..." if tokenization["chat_template_sha256"] else "none"),
        f"tokenization: max_length {tokenization['max_length']}, max_prompt_length "
        f"{tokenization['max_prompt_length']}, truncation {tokenization['truncation']}",
        _stats_line("chosen logps", cache.chosen_logps, cache.chosen_tokens),
        _stats_line("rejected logps", cache.rejected_logps, cache.rejected_tokens),
        f"built in {manifest['seconds']} s with "
        + ", ".join(f"{name} {version}" for name, version in manifest["versions"].items()),
    ]
    for split, report in manifest["data"].items():
        dropped = ", ".join(f"{reason} {count}" for reason, count in report["dropped"].items()) or "none"
        lines.append(
            f"data ({split}): {report['source']}, {report['format']} format, {report['total']} rows, "
            f"{report['kept']} kept, dropped: {dropped}, truncated {report['truncated']}"
        )
    return "\n".join(lines)


def _stats_line(name: str, logps: torch.Tensor, tokens: torch.Tensor) -> str:
    per_token = logps / tokens.clamp(min=1)
    return (
        f"{name}: mean {logps.mean():.2f}, min {logps.min():.2f}, max {logps.max():.2f}; "
        f"per token mean {per_token.mean():.3f}; tokens mean {tokens.float().mean():.1f}"
    )
