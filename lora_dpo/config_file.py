"""A YAML config file read into its sections, with one line for anything wrong with the file
(missing, a directory, unreadable, not UTF-8, not YAML, not a mapping)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from lora_dpo.errors import ConfigError


def read_config_file(path: Path) -> dict[str, Any]:
    """The sections of a YAML config file; anything wrong with the file is one line naming it."""
    if path.is_dir():
        raise ConfigError(f"{path}: a directory, not a config file")
    if not path.exists():
        raise ConfigError(f"config file not found: {path}")
    if not path.is_file():  # a FIFO or a device would block or never end
        raise ConfigError(f"{path}: not a regular file")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        text = data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{path}: not UTF-8: byte 0x{data[exc.start]:02x} at byte offset {exc.start}"
        ) from None
    try:
        raw = yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise ConfigError(f"{path}: {where}not valid YAML: {exc.problem or exc.context}") from None
    except yaml.reader.ReaderError as exc:  # a control character YAML does not allow
        line = text.count("\n", 0, exc.position) + 1
        column = exc.position - (text.rfind("\n", 0, exc.position) + 1) + 1
        raise ConfigError(
            f"{path}: line {line}, column {column}: not valid YAML: character U+{exc.character:04X} "
            "is not allowed"
        ) from None
    except (yaml.YAMLError, ValueError, RecursionError) as exc:  # e.g. a 5000-digit integer
        why = str(exc).splitlines()[0].split(";")[0][:200]  # not Python's advice on the limit
        raise ConfigError(f"{path}: not valid YAML: {why}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {type(raw).__name__}")
    return raw
