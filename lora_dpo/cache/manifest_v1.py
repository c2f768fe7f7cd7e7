"""`manifest.json` of format v1, as written before caches grew incrementally: one build over one
data set, shards planned over its length-sorted order. Read (and written back byte for byte),
and seen by everything else as the v2 `Manifest` it amounts to (`Manifest.from_v1`): the
shards of a v1 cache are v2 shards already."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

from lora_dpo.cache.entries import JsonFields, ReferenceIdentity, ReferenceRun, ShardEntry
from lora_dpo.cache.format import FORMAT_NAME, MANIFEST
from lora_dpo.data import DataReport
from lora_dpo.errors import CacheError
from lora_dpo.fileio import write_json


@dataclass(frozen=True)
class ManifestV1:
    format: ClassVar[str] = FORMAT_NAME
    version: ClassVar[int] = 1

    created: str  # ISO 8601, UTC, seconds
    identity: ReferenceIdentity
    reference: ReferenceRun
    data: dict[str, DataReport]  # per split
    pairs: dict[str, int]  # per split
    shards: tuple[ShardEntry, ...]  # in scoring order, numbered across splits
    seconds: float  # build wall time
    versions: dict[str, str]  # package -> version

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "version": self.version,
            "created": self.created,
            "identity": self.identity.to_dict(),
            "reference": asdict(self.reference),
            "data": {split: report.to_dict() for split, report in self.data.items()},
            "pairs": dict(self.pairs),
            "shards": [
                {"file": e.file, "split": e.split, "pairs": e.pairs, "sha256": e.sha256} for e in self.shards
            ],
            "seconds": self.seconds,
            "versions": dict(self.versions),
        }

    @classmethod
    def from_dict(cls, raw: Any, source: Path) -> ManifestV1:
        if not isinstance(raw, dict) or raw.get("format") != FORMAT_NAME:
            raise CacheError(f"{source}: not a {FORMAT_NAME} manifest")
        if raw.get("version") != cls.version:
            raise CacheError(f"{source}: format version {raw.get('version')}, expected 1")
        fields = JsonFields(source, raw)
        return cls(
            created=fields.take("created", str),
            identity=fields.identity(),
            reference=fields.reference(),
            data={split: report.data_report() for split, report in fields.sections("data").items()},
            pairs=fields.mapping("pairs", int),
            shards=fields.shard_entries(with_fields=False),
            seconds=fields.take("seconds", (int, float)),
            versions=fields.mapping("versions", str),
        )

    def write(self, cache_dir: Path) -> None:
        write_json(Path(cache_dir) / MANIFEST, self.to_dict())
