"""`manifest.json`, typed: what a cache holds and what it was built from, read and checked once.

The JSON keeps format v1 exactly (keys, order, `indent=2`), so caches written before this type
existed read back, and a new build writes the bytes an old one would.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

from lora_dpo.cache.format import FORMAT_NAME, FORMAT_VERSION, MANIFEST
from lora_dpo.data import DataReport
from lora_dpo.errors import CacheError
from lora_dpo.fileio import write_json


@dataclass(frozen=True)
class ModelIdentity:
    """Fingerprints, not the path: a cache moves between machines."""

    weights_sha256: str  # over the weight files' names and contents
    config_sha256: str | None  # of config.json; None when the model has none


@dataclass(frozen=True)
class ReferenceIdentity:
    """Everything that must match between a cache and a run, precision aside."""

    model: ModelIdentity
    # data.tokenization_settings(): owned by the data rules, compared key by key, shown as is
    tokenization: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {"model": asdict(self.model), "tokenization": dict(self.tokenization)}


@dataclass(frozen=True)
class ReferenceRun:
    """How the reference ran: `mode` is precompute.reference, the rest what it resolved to."""

    mode: str  # "policy" | "bf16" | "fp32"
    quantization: str  # "nf4" | "none"
    dtype: str  # torch dtype name, e.g. "float32"

    @property
    def precision(self) -> dict[str, str]:
        """In the form of `Precision.to_dict()`, to compare with a run's."""
        return {"quantization": self.quantization, "dtype": self.dtype}


@dataclass(frozen=True)
class ShardEntry:
    file: str  # relative to the cache directory
    split: str
    pairs: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    format: ClassVar[str] = FORMAT_NAME
    version: ClassVar[int] = FORMAT_VERSION

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
            "shards": [asdict(entry) for entry in self.shards],
            "seconds": self.seconds,
            "versions": dict(self.versions),
        }

    @classmethod
    def from_dict(cls, raw: Any, source: Path) -> Manifest:
        """The manifest in `raw` (parsed JSON), or a one-line CacheError naming `source` and
        the field at fault."""
        if not isinstance(raw, dict) or raw.get("format") != FORMAT_NAME:
            raise CacheError(f"{source}: not a {FORMAT_NAME} manifest")
        if raw.get("version") != FORMAT_VERSION:
            raise CacheError(
                f"{source}: format version {raw.get('version')}, this lora-dpo reads version {FORMAT_VERSION}"
            )
        fields = _Fields(source, raw)
        identity, reference = fields.section("identity"), fields.section("reference")
        model = identity.section("model")
        return cls(
            created=fields.take("created", str),
            identity=ReferenceIdentity(
                ModelIdentity(model.take("weights_sha256", str), model.take("config_sha256", (str, type(None)))),
                identity.take("tokenization", dict),
            ),
            reference=ReferenceRun(reference.take("mode", str), reference.take("quantization", str), reference.take("dtype", str)),
            data={split: report.data_report() for split, report in fields.sections("data").items()},
            pairs=fields.mapping("pairs", int),
            shards=tuple(
                ShardEntry(e.take("file", str), e.take("split", str), e.take("pairs", int), e.take("sha256", str))
                for e in fields.items("shards")
            ),
            seconds=fields.take("seconds", (int, float)),
            versions=fields.mapping("versions", str),
        )

    @classmethod
    def from_json(cls, text: str, source: Path) -> Manifest:
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            raise CacheError(f"{source}: not valid JSON ({exc})") from None
        return cls.from_dict(raw, source)

    @classmethod
    def read(cls, cache_dir: Path) -> Manifest:
        """The manifest of a complete cache of this format version, else a CacheError saying why."""
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
        """Last step of a build: its presence marks the cache complete."""
        write_json(Path(cache_dir) / MANIFEST, self.to_dict())


@dataclass(frozen=True)
class _Fields:
    """One JSON object of a manifest; a missing or mistyped field is named by its dotted path."""

    source: Path
    values: dict[str, Any]
    prefix: str = ""

    def take(self, key: str, kind: type | tuple[type, ...]) -> Any:
        name = f"{self.prefix}{key}"
        if key not in self.values:
            raise CacheError(f"{self.source}: field {name} is missing")
        return self._check(name, self.values[key], kind)

    def _check(self, name: str, value: Any, kind: type | tuple[type, ...]) -> Any:
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            expected = " or ".join("null" if k is type(None) else k.__name__ for k in kinds)
            raise CacheError(f"{self.source}: field {name} is {type(value).__name__}, expected {expected}")
        return value

    def section(self, key: str) -> _Fields:
        return _Fields(self.source, self.take(key, dict), f"{self.prefix}{key}.")

    def sections(self, key: str) -> dict[str, _Fields]:
        """An object of objects, e.g. data.<split>."""
        outer = self.section(key)
        return {name: outer.section(name) for name in outer.values}

    def items(self, key: str) -> list[_Fields]:
        """A list of objects, e.g. shards[0]."""
        name = f"{self.prefix}{key}"
        return [
            _Fields(self.source, self._check(f"{name}[{i}]", item, dict), f"{name}[{i}].")
            for i, item in enumerate(self.take(key, list))
        ]

    def mapping(self, key: str, kind: type) -> dict[str, Any]:
        outer = self.section(key)
        return {name: outer.take(name, kind) for name in outer.values}

    def data_report(self) -> DataReport:
        try:
            return DataReport(**self.values)
        except TypeError as exc:  # a field missing or unknown
            raise CacheError(f"{self.source}: field {self.prefix.rstrip('.')} is not a data report ({exc})") from None
