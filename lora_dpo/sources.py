"""Read preference rows from a file, a `save_to_disk` directory or a hub data set.

A line or item that cannot be a row (not valid JSON, not UTF-8, not an object, a CSV record
with extra fields) does not stop the read: it takes its row's place as an `Unreadable` with a
reason and a detail, and the data layer drops it (counted) or, in strict mode, raises. Rows of
JSON Lines and CSV files keep the 1-based line they start on, so a report can point at it.
Only what makes the whole source unreadable (a missing file, a damaged gzip stream, a .json
file that does not parse) is a DataError here.

A row longer than `max_row_bytes` (data.max_row_bytes) becomes an Unreadable `row_too_large`
before it is parsed, so memory follows the rows kept, not the largest row:
- .jsonl and .jsonl.gz files are read a bounded piece at a time: an over-long line is
  skipped without ever being held whole, so a row costs memory only if it is kept;
- parquet files, datasets directories and hub sets are read a batch of rows at a time, each
  row measured by its text (the UTF-8 bytes of its strings);
- a .json file and a CSV file are read whole (a JSON document cannot be split before it is
  parsed, and a CSV field may span lines), so they cost their file's size once while read;
  their rows are measured by their text, or by their line for JSON Lines under a .json name.
"""

from __future__ import annotations

import codecs
import csv
import gzip
import io
import json
import os
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lora_dpo.config import DataConfig
from lora_dpo.errors import DataError

# Suffixes that make a name a local file rather than a hub data set.
LOCAL_SUFFIXES = (".jsonl", ".json", ".gz", ".parquet", ".csv", ".tsv", ".txt", ".arrow")
SUPPORTED = ".jsonl, .json, .jsonl.gz, .parquet, .csv or a datasets save_to_disk directory"

INVALID_JSON = "invalid_json"
NOT_AN_OBJECT = "not_an_object"
NOT_UTF8 = "not_utf8"
MALFORMED_ROW = "malformed_row"
ROW_TOO_LARGE = "row_too_large"

# Bytes read at a time past the limit of an over-long line, and rows per batch of a parquet
# file or a datasets table: small next to any row limit, large enough to read fast.
READ_CHUNK = 1 << 20
BATCH_ROWS = 1024


@dataclass(frozen=True)
class Unreadable:
    """Stands in for a line or item that is not a row; `reason` is the report key."""

    reason: str
    detail: str


@dataclass
class Source:
    rows: list[Any]  # dicts, and Unreadable where a line or item is not one
    lines: list[int] | None = None  # 1-based line each row starts on (JSON Lines and CSV)


def read_source(path: str, split: str = "train", max_row_bytes: int = DataConfig.max_row_bytes) -> Source:
    if not path:
        raise DataError("no data path given")
    local = Path(os.path.expanduser(path))
    if local.is_dir():
        return Source(_read_saved_dataset(local, split, max_row_bytes))
    if local.is_file():
        return _read_file(local, max_row_bytes)
    if looks_local(path):
        raise DataError(f"file not found: {path}")
    return Source(_read_hub(path, split, max_row_bytes))


def looks_local(path: str) -> bool:
    # A hub name is "owner/name" or "name": one slash at most, relative, no file suffix.
    return (
        path.startswith(("/", ".", "~"))
        or "\\" in path
        or path.count("/") > 1
        or path.lower().endswith(LOCAL_SUFFIXES)
    )


def json_type(value: Any) -> str:
    """How a user sees a value's type in a JSON file."""
    names = {
        dict: "an object",
        list: "a list",
        str: "a string",
        bool: "a boolean",
        int: "a number",
        float: "a number",
        type(None): "null",
    }
    return names.get(type(value), type(value).__name__)


def first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]


def _too_large(size: int, limit: int) -> Unreadable:
    return Unreadable(ROW_TOO_LARGE, f"{size} bytes, more than data.max_row_bytes={limit}")


def _text_bytes(row: Any) -> int:
    """The UTF-8 size of a row's strings, keys too; other values count their printed length."""
    total, stack = 0, [row]
    while stack:
        value = stack.pop()
        if isinstance(value, str):  # isascii() is O(1): most text costs no encoding
            total += len(value) if value.isascii() else len(value.encode("utf-8", "surrogatepass"))
        elif isinstance(value, dict):
            stack += value.keys()
            stack += value.values()
        elif isinstance(value, (list, tuple)):
            stack += value
        elif value is not None:
            total += len(str(value))
    return total


def _limit(row: Any, limit: int) -> Any:
    size = _text_bytes(row)
    return _too_large(size, limit) if size > limit else row


def _read_file(path: Path, limit: int) -> Source:
    name = path.name.lower()
    try:
        if name.endswith(".jsonl.gz"):
            with gzip.open(path, "rb") as handle:
                return _parse_jsonl(handle, path, limit, " of the decompressed data")
        if name.endswith(".jsonl"):
            with open(path, "rb") as handle:
                return _parse_jsonl(handle, path, limit)
        if name.endswith(".json"):
            return _read_json(path, limit)
        if name.endswith(".parquet"):
            return Source(_read_parquet(path, limit))
        if name.endswith(".csv"):
            return _read_csv(path, limit)
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{path}: cannot read: {first_line(exc)}") from None
    raise DataError(f"{path}: unsupported file type; use {SUPPORTED}")


def _lines(handle: io.BufferedIOBase, limit: int) -> Iterator[tuple[bytes | None, int, int]]:
    """(line, its bytes in the stream, its length without the line end) for each line; the
    line is None when that length is over `limit`: such a line is read on in bounded pieces
    and never held whole. Split on b"\\n" only: JSON strings may hold U+2028 and other
    characters that str.splitlines() would take for line ends."""
    while piece := handle.readline(limit + 2):  # the longest line kept, with b"\r\n"
        size = len(piece)
        if not piece.endswith(b"\n") and size == limit + 2:  # longer: skip to its end
            while not piece.endswith(b"\n") and (piece := handle.readline(READ_CHUNK)):
                size += len(piece)
            line = None
        else:
            line = piece
        length = size - (2 if piece.endswith(b"\r\n") else 1 if piece.endswith(b"\n") else 0)
        yield (line if length <= limit else None), size, length


def _parse_jsonl(handle: io.BufferedIOBase, path: Path, limit: int, offset_note: str = "") -> Source:
    """One row per non-blank line, an Unreadable for a line longer than `limit` bytes."""
    rows: list[Any] = []
    numbers: list[int] = []
    offset, number = 0, 0
    try:
        for number, (raw, size, length) in enumerate(_lines(handle, limit), start=1):
            start, offset = offset, offset + size
            if raw is None:
                numbers.append(number)
                rows.append(_too_large(length, limit))
                continue
            if number == 1 and raw.startswith(codecs.BOM_UTF8):
                raw, start = raw[len(codecs.BOM_UTF8) :], start + len(codecs.BOM_UTF8)
            if not raw.strip():
                continue
            numbers.append(number)
            rows.append(_parse_json_line(raw, start, offset_note))
    except (OSError, EOFError, zlib.error) as exc:  # a damaged or truncated gzip stream
        raise DataError(f"{path}: cannot read past line {number}: {first_line(exc)}") from None
    return Source(rows, numbers)


def _parse_json_line(raw: bytes, start: int, offset_note: str) -> Any:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return Unreadable(
            NOT_UTF8,
            f"byte 0x{raw[exc.start]:02x} at byte offset {start + exc.start}{offset_note} is not UTF-8",
        )
    try:
        row = json.loads(text)
    except json.JSONDecodeError as exc:
        column = min(exc.pos, len(text.rstrip("\r\n"))) + 1  # not past the line's end
        return Unreadable(INVALID_JSON, f"not valid JSON: {exc.msg} (column {column})")
    except (ValueError, RecursionError) as exc:  # e.g. nesting too deep, 5000-digit numbers
        return Unreadable(INVALID_JSON, f"not valid JSON: {first_line(exc)}")
    if not isinstance(row, dict):
        return Unreadable(NOT_AN_OBJECT, f"expected a JSON object, got {json_type(row)}")
    return row


def _decode(data: bytes) -> str:
    """UTF-8 text; undecodable bytes become lone surrogates that the row checks catch, so one
    bad byte costs one row rather than the whole file."""
    return data.decode("utf-8", "surrogateescape").removeprefix("\ufeff")


def _read_json(path: Path, limit: int) -> Source:
    data = path.read_bytes()
    try:
        parsed = json.loads(_decode(data))
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":  # many ".json" files on the hub are really JSON Lines
            return _parse_jsonl(io.BytesIO(data), path, limit)
        raise DataError(
            f"{path}: not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from None
    except (ValueError, RecursionError) as exc:
        raise DataError(f"{path}: not valid JSON: {first_line(exc)}") from None
    if isinstance(parsed, dict) and isinstance(parsed.get("data"), list):
        parsed = parsed["data"]
    if not isinstance(parsed, list):
        raise DataError(f'{path}: expected a list of objects or {{"data": [...]}}')
    return Source(
        [
            _limit(item, limit)
            if isinstance(item, dict)
            else Unreadable(NOT_AN_OBJECT, f"expected a JSON object, got {json_type(item)}")
            for item in parsed
        ]
    )


def _limit_batches(batches: Iterable[list[dict]], limit: int) -> list[Any]:
    """Rows of a batched source; one batch is held at a time besides the rows kept."""
    return [_limit(row, limit) for batch in batches for row in batch]


def _read_parquet(path: Path, limit: int) -> list[Any]:
    import pyarrow
    import pyarrow.parquet

    try:
        batches = pyarrow.parquet.ParquetFile(path).iter_batches(batch_size=BATCH_ROWS)
        return _limit_batches((batch.to_pylist() for batch in batches), limit)
    except pyarrow.ArrowException as exc:
        raise DataError(f"{path}: not a readable parquet file: {first_line(exc)}") from None


def _read_csv(path: Path, limit: int) -> Source:
    # Transcripts are longer than the csv module's default 128 KiB field limit.
    csv.field_size_limit(2**31 - 1)
    reader = csv.reader(io.StringIO(_decode(path.read_bytes()), newline=""))
    rows, lines = [], []
    try:
        header = next(reader, None)
        if header is None:
            return Source([], [])
        before = reader.line_num
        for record in reader:
            start, before = before + 1, reader.line_num  # a quoted field may span lines
            if not record:
                continue
            lines.append(start)
            if len(record) > len(header) and any(v.strip() for v in record[len(header) :]):
                rows.append(Unreadable(MALFORMED_ROW, f"{len(record)} fields, the header has {len(header)}"))
            else:  # a short record lacks its last fields: the row checks name them
                rows.append(_limit(dict(zip(header, record)), limit))
    except csv.Error as exc:
        raise DataError(f"{path}: line {reader.line_num}: not readable as CSV: {exc}") from None
    return Source(rows, lines)


def _dataset_rows(loaded: Any, limit: int) -> list[Any]:
    """A datasets table's rows, as `Dataset.to_list()` gives them, a batch at a time."""
    batches = loaded.iter(batch_size=BATCH_ROWS)  # each a dict of columns
    return _limit_batches(
        ([dict(zip(batch, values)) for values in zip(*batch.values())] for batch in batches), limit
    )


def _read_saved_dataset(path: Path, split: str, limit: int) -> list[Any]:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as exc:  # the library raises several types for "not a dataset dir"
        raise DataError(
            f"{path}: a directory, but not a datasets save_to_disk directory: {first_line(exc)}"
        ) from None
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DataError(f"{path}: no split {split!r}; splits: {', '.join(loaded)}")
        loaded = loaded[split]
    return _dataset_rows(loaded, limit)


def _read_hub(name: str, split: str, limit: int) -> list[Any]:
    from lora_dpo.hub import go_offline_if_unreachable, offline_reason

    offline = go_offline_if_unreachable()  # seconds, not half a minute of retries
    import datasets

    try:
        loaded = datasets.load_dataset(name, split=split)
    except Exception as exc:  # HTTP, offline-mode, not-found and split errors all end here
        why = f"{offline_reason()}: {first_line(exc)}" if offline else first_line(exc)
        raise DataError(
            f"{name!r} is not a local file or directory, and loading it from the Hugging Face "
            f"Hub (split {split!r}) failed: {why}. Hub data sets need network access; "
            f"offline, give a local path ({SUPPORTED})"
        ) from None
    return _dataset_rows(loaded, limit)
