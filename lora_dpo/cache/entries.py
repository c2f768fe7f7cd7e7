"""The parts every manifest version shares: the reference identity, how the reference ran, a
shard entry, and the checked reading of JSON objects (a bad field is named by its dotted path)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from lora_dpo.cache.format import FIELD_NAME, SHARD_KEYS, is_shard_name
from lora_dpo.data import DataReport
from lora_dpo.errors import CacheError


@dataclass(frozen=True)
class ModelIdentity:
    """Fingerprints, not the path: a cache moves between machines."""

    weights_sha256: str  # over the weight files' names and contents
    config_sha256: str | None  # of config.json; None when the model has none
    # of the start adapter's weights (model.adapter_path); None, and not written, without one
    adapter_sha256: str | None = None

    def to_dict(self) -> dict[str, Any]:
        fields = asdict(self)
        if self.adapter_sha256 is None:  # a cache without an adapter reads as it always did
            del fields["adapter_sha256"]
        return fields


@dataclass(frozen=True)
class ReferenceIdentity:
    """Everything that must match between a cache and a run, precision aside."""

    model: ModelIdentity
    # data.tokenization_settings(): owned by the data rules, compared key by key, shown as is
    tokenization: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model.to_dict(), "tokenization": dict(self.tokenization)}


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
    file: str  # a plain shard name inside the cache directory (format.SHARD_NAME)
    split: str  # the split its pairs were scored for
    pairs: int
    sha256: str
    fields: tuple[str, ...] = SHARD_KEYS  # the tensors it holds, required ones first

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "fields": list(self.fields)}


@dataclass(frozen=True)
class JsonFields:
    """One JSON object of a manifest; a missing or mistyped field is named by its dotted path."""

    source: Path
    values: dict[str, Any]
    prefix: str = ""

    def fail(self, key: str, problem: str) -> CacheError:
        return CacheError(f"{self.source}: field {self.prefix}{key} {problem}")

    def take(self, key: str, kind: type | tuple[type, ...]) -> Any:
        if key not in self.values:
            raise self.fail(key, "is missing")
        return self._check(f"{self.prefix}{key}", self.values[key], kind)

    def _check(self, name: str, value: Any, kind: type | tuple[type, ...]) -> Any:
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            expected = " or ".join("null" if k is type(None) else k.__name__ for k in kinds)
            raise CacheError(f"{self.source}: field {name} is {type(value).__name__}, expected {expected}")
        return value

    def section(self, key: str) -> JsonFields:
        return JsonFields(self.source, self.take(key, dict), f"{self.prefix}{key}.")

    def sections(self, key: str) -> dict[str, JsonFields]:
        """An object of objects, e.g. data.<split>."""
        outer = self.section(key)
        return {name: outer.section(name) for name in outer.values}

    def items(self, key: str) -> list[JsonFields]:
        """A list of objects, e.g. shards[0]."""
        name = f"{self.prefix}{key}"
        return [
            JsonFields(self.source, self._check(f"{name}[{i}]", item, dict), f"{name}[{i}].")
            for i, item in enumerate(self.take(key, list))
        ]

    def mapping(self, key: str, kind: type) -> dict[str, Any]:
        outer = self.section(key)
        return {name: outer.take(name, kind) for name in outer.values}

    def strings(self, key: str) -> list[str]:
        name = f"{self.prefix}{key}"
        return [self._check(f"{name}[{i}]", item, str) for i, item in enumerate(self.take(key, list))]

    def data_report(self) -> DataReport:
        try:
            return DataReport(**self.values)
        except TypeError as exc:  # a field missing or unknown
            raise CacheError(
                f"{self.source}: field {self.prefix.rstrip('.')} is not a data report ({exc})"
            ) from None

    # ------------------------------------------------------------------ the shared sections

    def identity(self) -> ReferenceIdentity:
        identity = self.section("identity")
        model = identity.section("model")
        return ReferenceIdentity(
            ModelIdentity(
                model.take("weights_sha256", str),
                model.take("config_sha256", (str, type(None))),
                model.take("adapter_sha256", str) if "adapter_sha256" in model.values else None,
            ),
            identity.take("tokenization", dict),
        )

    def reference(self) -> ReferenceRun:
        reference = self.section("reference")
        return ReferenceRun(
            reference.take("mode", str), reference.take("quantization", str), reference.take("dtype", str)
        )

    def shard_entries(self, with_fields: bool) -> tuple[ShardEntry, ...]:
        """The `shards` list, every file name checked before anything opens it; unique names."""
        entries = []
        for item in self.items("shards"):
            name = item.take("file", str)
            if not is_shard_name(name):
                raise item.fail(
                    "file", f"is {name!r}, not a shard file name inside the cache (shard-<hex>.safetensors)"
                )
            fields = tuple(item.strings("fields")) if with_fields else SHARD_KEYS
            unknown = [f for f in fields if not FIELD_NAME.fullmatch(f)]
            missing = [f for f in SHARD_KEYS if f not in fields]
            if unknown or missing or len(set(fields)) != len(fields):
                problem = (
                    f"names {unknown[0]!r}"
                    if unknown
                    else f"lacks {missing[0]}"
                    if missing
                    else "repeats a name"
                )
                raise item.fail("fields", problem)
            entries.append(
                ShardEntry(
                    name, item.take("split", str), item.take("pairs", int), item.take("sha256", str), fields
                )
            )
        names = [entry.file for entry in entries]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise self.fail("shards", f"lists {repeated[0]} twice")
        return tuple(entries)
