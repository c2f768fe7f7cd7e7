"""The valid values of a config setting, declared once beside its default.

    beta: float = setting(0.1, above(0))
    max_steps: int = setting(-1, above(0).also(-1, "all epochs"))

`Config.validate` checks every field that has a domain and names key, value and domain in
one line (`train.beta=0.0: must be > 0 and finite`); the docs say the same words.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

DOMAIN = "domain"  # the dataclass field metadata key that holds a setting's Domain


@dataclass(frozen=True)
class Domain:
    """The values a setting accepts; `describe` is how errors and the docs say it.

    Numbers: an interval (a float must also be finite: inf or nan is never a learning rate),
    plus `special` values outside it that mean something, e.g. `-1` for "all epochs".
    Strings: `choices`.
    """

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    special: tuple[tuple[Any, str], ...] = ()  # (value, what it means)
    choices: tuple[str, ...] = ()

    def allows(self, value: Any) -> bool:
        if any(value == special for special, _ in self.special):
            return True
        if self.choices:
            return value in self.choices
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            return False
        if self.low is not None and not (value > self.low if self.low_open else value >= self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def describe(self, is_float: bool = False) -> str:
        if self.choices:
            return f"one of {', '.join(self.choices)}"
        parts = [f"{_spell(value)} ({meaning})" for value, meaning in self.special]
        if self.low is not None and self.high is not None:
            parts.append(
                f"in {'(' if self.low_open else '['}{_spell(self.low)}, "
                f"{_spell(self.high)}{')' if self.high_open else ']'}"
            )
        elif self.low is not None:
            finite = " and finite" if is_float else ""
            parts.append(f"{'>' if self.low_open else '>='} {_spell(self.low)}{finite}")
        return " or ".join(parts)

    def also(self, value: Any, meaning: str) -> Domain:
        """The same domain, plus one value outside it that means something."""
        return dataclasses.replace(self, special=(*self.special, (value, meaning)))


def _spell(value: Any) -> str:
    if value is None:
        return "none"
    return f"{value:g}" if isinstance(value, float) else str(value)


def above(low: float) -> Domain:
    return Domain(low=low, low_open=True)


def at_least(low: float) -> Domain:
    return Domain(low=low)


def between(low: float, high: float, *, high_open: bool = False) -> Domain:
    return Domain(low=low, high=high, high_open=high_open)


def one_of(*choices: str) -> Domain:
    return Domain(choices=choices)


def setting(default: Any, domain: Domain) -> Any:
    """A config field with its default and its domain, checked by `Config.validate`."""
    return field(default=default, metadata={DOMAIN: domain})
