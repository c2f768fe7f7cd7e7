"""`lora-dpo data check`: the validation pass of precompute-ref and train, alone.

It loads the tokenizer (truncation is counted in tokens) and runs `load_preference_data` on
the train split and, when configured, the eval split, exactly as the two stages do before any
model work, then prints each split's report. No model weights are loaded.
"""

from __future__ import annotations

from dataclasses import dataclass

from lora_dpo.config import Config
from lora_dpo.data import DataReport, load_preference_data, no_pairs_message
from lora_dpo.errors import DataError


@dataclass
class DataCheck:
    reports: dict[str, DataReport]  # "train", and "eval" when data.eval_path is set

    @property
    def unusable(self) -> list[DataReport]:
        """Splits with no pair left: precompute-ref and train would stop on them."""
        return [report for report in self.reports.values() if report.kept == 0]

    def summary(self) -> str:
        parts = [f"{split} split: {report.summary()}" for split, report in self.reports.items()]
        counts = ", ".join(f"{split} {report.kept} pairs" for split, report in self.reports.items())
        verdict = "not usable" if self.unusable else "usable"
        return "\n".join(parts + [f"data check: {verdict} ({counts})"])


def check_data(config: Config) -> DataCheck:
    from lora_dpo.losses import LossSettings
    from lora_dpo.model import load_tokenizer

    tokenizer = load_tokenizer(config.model)
    splits = ["train"] + (["eval"] if config.data.eval_path else [])
    unpaired = LossSettings.of(config.train).unpaired  # KTO checks its unpaired rows
    reports = {
        split: load_preference_data(config.data, tokenizer, split, allow_empty=True, unpaired=unpaired)[1]
        for split in splits
    }
    return DataCheck(reports)


def run_data_check(config: Config) -> int:
    """Print the reports; 0 when every split has pairs, else a DataError (exit code 2)."""
    check = check_data(config)
    print(check.summary())
    if check.unusable:
        raise DataError(no_pairs_message(check.unusable[0]))
    return 0
