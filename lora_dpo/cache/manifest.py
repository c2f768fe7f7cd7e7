"""`manifest.json`, typed: what a cache holds, which data sets it covers, how it came to be;
read and checked once. Format v2; a v1 file is read as the v2 manifest it amounts to.

    format, version      "lora-dpo-reference-cache", 2
    identity, reference  what the values depend on (a cache holds one reference's values)
    pairs                pairs in the cache, by the split they were scored for (sum of shards)
    datasets             every data set the cache covers: split and its data report
    shards               file, split, pairs, sha256, fields (the tensors it holds)
    history              every change: when, what, pairs added, pairs scored, seconds, versions
    rows                 "paired" (preference pairs), or "unpaired": KTO's rows, each shard's
                         chosen_* fields its completions, rejected_* its KL completions, paired
                         as `kl_pairing` says (lora_dpo.data.unpaired); absent means "paired"
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, ClassVar

from lora_dpo.cache.entries import JsonFields, ModelIdentity, ReferenceIdentity, ReferenceRun, ShardEntry
from lora_dpo.cache.format import FORMAT_NAME, FORMAT_VERSION, MANIFEST, READABLE_VERSIONS
from lora_dpo.cache.manifest_v1 import ManifestV1
from lora_dpo.data import DataReport
from lora_dpo.data.unpaired import KL_PAIRING
from lora_dpo.errors import CacheError
from lora_dpo.fileio import write_json
from lora_dpo.versions import package_versions

__all__ = [
    "Change",
    "DataSet",
    "Manifest",
    "ModelIdentity",
    "ReferenceIdentity",
    "ReferenceRun",
    "ShardEntry",
    "now",
]


# What a row of the cache holds (the manifest's `rows`).
PAIRED, UNPAIRED = "paired", "unpaired"


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass(frozen=True)
class DataSet:
    """A data set the cache covers: every pair it kept is in the cache."""

    split: str  # "train" | "eval"
    report: DataReport  # its own data report: source, rows, drops, lengths

    @property
    def pairs(self) -> int:
        return self.report.kept

    def to_dict(self) -> dict[str, Any]:
        return {"split": self.split, "report": self.report.to_dict()}


@dataclass(frozen=True)
class Change:
    """One write of the cache: a precompute-ref, an import or a merge."""

    at: str  # ISO 8601, UTC, seconds
    what: str  # e.g. "precompute-ref", "import ref.parquet", "merge a, b"
    added: int  # pairs new to the cache
    scored: int  # pairs the reference model ran on (0 for import and merge)
    seconds: float
    versions: dict[str, str]  # package -> version

    @classmethod
    def of(cls, what: str, added: int, scored: int = 0, seconds: float = 0.0) -> Change:
        return cls(now(), what, added, scored, round(seconds, 2), package_versions())


@dataclass(frozen=True)
class Manifest:
    format: ClassVar[str] = FORMAT_NAME

    identity: ReferenceIdentity
    reference: ReferenceRun
    pairs: dict[str, int]  # pairs in the cache by the split they were scored for: the shards' sums
    datasets: tuple[DataSet, ...]
    shards: tuple[ShardEntry, ...]
    history: tuple[Change, ...]  # oldest first
    version: int = FORMAT_VERSION  # of the file it was read from; always written as FORMAT_VERSION
    rows: str = PAIRED  # PAIRED or UNPAIRED: what one shard row holds

    @classmethod
    def empty(cls, identity: ReferenceIdentity, reference: ReferenceRun, rows: str = PAIRED) -> Manifest:
        """A cache of this reference with nothing in it yet, to add to."""
        return cls(identity, reference, {}, (), (), (), rows=rows)

    def require_rows(self, unpaired: bool, cache_dir: Path, loss_type: str) -> None:
        """A CacheError, one line, when the cache holds the other kind of row than the
        objective reads: a KTO run needs a cache of unpaired rows, the others of pairs."""
        wanted = UNPAIRED if unpaired else PAIRED
        if self.rows != wanted:
            raise CacheError(
                f"{cache_dir}: the reference cache holds {self.rows} rows and train.loss_type={loss_type} "
                f"reads {wanted} ones; build a cache for it with `lora-dpo precompute-ref` and this config "
                "into another precompute.cache_dir, or replace this one with `lora-dpo precompute-ref --rebuild`"
            )

    @property
    def total_pairs(self) -> int:
        return sum(entry.pairs for entry in self.shards)

    @property
    def created(self) -> str:
        return self.history[0].at

    def with_additions(
        self,
        shards: tuple[ShardEntry, ...],
        datasets: tuple[DataSet, ...],
        change: Change,
        history: tuple[Change, ...] = (),
    ) -> Manifest:
        """This manifest with more shards, data sets and history (duplicates dropped), plus `change`."""
        return replace(
            self,
            pairs=pairs_by_split(self.shards + shards),
            shards=self.shards + shards,
            datasets=union(self.datasets, datasets),
            history=(*union(self.history, history), change),
            version=FORMAT_VERSION,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "version": FORMAT_VERSION,
            "identity": self.identity.to_dict(),
            "reference": asdict(self.reference),
            "pairs": dict(self.pairs),
            "datasets": [dataset.to_dict() for dataset in self.datasets],
            "shards": [entry.to_dict() for entry in self.shards],
            "history": [asdict(change) for change in self.history],
            **({"rows": self.rows, "kl_pairing": KL_PAIRING} if self.rows == UNPAIRED else {}),
        }

    @classmethod
    def from_v1(cls, old: ManifestV1) -> Manifest:
        """A v1 cache as v2: one data set per split, its one build as the history."""
        total = sum(old.pairs.values())
        return cls(
            identity=old.identity,
            reference=old.reference,
            pairs=dict(old.pairs),
            datasets=tuple(DataSet(split, report) for split, report in old.data.items()),
            shards=old.shards,
            history=(
                Change(
                    old.created, "precompute-ref (format v1)", total, total, old.seconds, dict(old.versions)
                ),
            ),
            version=old.version,
        )

    @classmethod
    def from_dict(cls, raw: Any, source: Path) -> Manifest:
        """The manifest in `raw` (parsed JSON), or a one-line CacheError naming `source` and
        the field at fault."""
        if not isinstance(raw, dict) or raw.get("format") != FORMAT_NAME:
            raise CacheError(f"{source}: not a {FORMAT_NAME} manifest")
        version = raw.get("version")
        if version not in READABLE_VERSIONS or isinstance(version, bool):
            readable = " and ".join(str(v) for v in READABLE_VERSIONS)
            raise CacheError(f"{source}: format version {version}, this lora-dpo reads versions {readable}")
        if version == 1:
            return cls.from_v1(ManifestV1.from_dict(raw, source))
        fields = JsonFields(source, raw)
        manifest = cls(
            identity=fields.identity(),
            reference=fields.reference(),
            pairs=fields.mapping("pairs", int),
            datasets=tuple(
                DataSet(item.take("split", str), item.section("report").data_report())
                for item in fields.items("datasets")
            ),
            shards=fields.shard_entries(with_fields=True),
            history=tuple(
                Change(
                    item.take("at", str),
                    item.take("what", str),
                    item.take("added", int),
                    item.take("scored", int),
                    item.take("seconds", (int, float)),
                    item.mapping("versions", str),
                )
                for item in fields.items("history")
            ),
        )
        rows = raw.get("rows", PAIRED)
        if rows not in (PAIRED, UNPAIRED):
            raise fields.fail("rows", f"is {rows!r}, expected {PAIRED!r} or {UNPAIRED!r}")
        if rows == UNPAIRED and raw.get("kl_pairing") != KL_PAIRING:
            raise fields.fail(
                "kl_pairing", f"is {raw.get('kl_pairing')!r}; this lora-dpo pairs rows as {KL_PAIRING!r}"
            )
        manifest = replace(manifest, rows=rows)
        if not manifest.history:
            raise fields.fail("history", "is empty")
        if manifest.pairs != pairs_by_split(manifest.shards):
            raise fields.fail(
                "pairs", f"says {manifest.pairs}, the shards listed hold {pairs_by_split(manifest.shards)}"
            )
        return manifest

    @classmethod
    def from_json(cls, text: str, source: Path) -> Manifest:
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            raise CacheError(f"{source}: not valid JSON ({exc})") from None
        return cls.from_dict(raw, source)

    @classmethod
    def read(cls, cache_dir: Path) -> Manifest:
        """The manifest of a complete cache, else a CacheError saying why."""
        path = Path(cache_dir) / MANIFEST
        if not path.is_file():
            raise CacheError(
                f"{cache_dir}: no {MANIFEST}; not a reference cache, or its precompute did "
                "not finish (run precompute-ref again: it resumes from complete shards)"
            )
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise CacheError(f"{path}: unreadable ({exc})") from None
        return cls.from_json(text, path)

    def write(self, cache_dir: Path) -> None:
        """Atomically: a reader sees the old manifest or this one, never a mix."""
        write_json(Path(cache_dir) / MANIFEST, self.to_dict())


def pairs_by_split(shards: tuple[ShardEntry, ...]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for entry in shards:
        counts[entry.split] = counts.get(entry.split, 0) + entry.pairs
    return counts


def union(first: tuple[Any, ...], second: tuple[Any, ...]) -> tuple[Any, ...]:
    """`first`, then each item of `second` not seen before (order kept; compared by equality,
    as data reports are not hashable)."""
    items = list(first)
    for item in second:
        if item not in items:
            items.append(item)
    return tuple(items)
