"""The demo's preference task: describe a person, kind words preferred over unkind ones.

A tiny model can learn it in a few hundred steps on a CPU; held-out pairs use names that
never appear in training, so accuracy on them measures the preference, not memorised names.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

from lora_dpo.fileio import write_text

NAMES = (
    "Ada Alan Grace Edsger Barbara Donald Frances John Margaret Ken Dennis Radia Leslie Tony "
    "Niklaus Shafi Sophie Linus Guido Bjarne Anders Yukihiro Larry Brian Rob Robin Jean Hedy "
    "Katherine Dorothy Mary Annie Vint Tim Whitfield Martin Ivan Butler Judea Geoffrey"
).split()
KIND = "kind honest patient generous gentle brave thoughtful clever warm curious calm fair".split()
UNKIND = "rude cruel lazy greedy harsh sneaky bitter petty vain cold selfish sloppy".split()
HELD_OUT_NAMES = 10  # the last names never appear in training pairs


def make_pairs(names: list[str], count: int, rng: random.Random) -> list[dict[str, str]]:
    rows = []
    for _ in range(count):
        name = rng.choice(names)
        kind, unkind = rng.sample(KIND, 2), rng.sample(UNKIND, 2)
        rows.append(
            {
                "prompt": f"Describe {name} in a few words.\n",
                "chosen": f"{name} is {kind[0]} and {kind[1]}.",
                "rejected": f"{name} is {unkind[0]} and {unkind[1]}.",
            }
        )
    return rows


DESCRIPTION = re.compile(r"\s*\S.* is (\w+) and (\w+)\.\s*")


def only_kind_words(description: str) -> bool:
    """Whether a text is a description in the task's format, "X is A and B.", with both words
    kind (text that is not in the format is no kind description)."""
    match = DESCRIPTION.fullmatch(description)
    return match is not None and all(word in KIND for word in match.groups())


def write_jsonl(path: Path, rows: list[dict[str, str]]) -> None:
    write_text(path, "".join(json.dumps(row) + "\n" for row in rows))
