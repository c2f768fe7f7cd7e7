"""lora-dpo: memory-efficient LoRA/QLoRA DPO training with a cached, portable reference.

Training runs in two stages, so that only one model is ever in memory:

1. precompute-ref runs the frozen reference model once over the preference pairs and writes
   each pair's reference log-probabilities to a checksummed cache (`build_cache`);
2. train fits a LoRA (or QLoRA, on a 4-bit base) policy with the DPO loss against that cache
   (`lora_dpo.train.train`); `lora_dpo.merge.merge` then folds the adapter into its base.

The `lora-dpo` command drives both. The names in `__all__` load on first use, so that
`import lora_dpo` stays light (no torch) for the command line. `train` and `merge` are not
among them: they would be shadowed by the submodules of the same names.
"""

from __future__ import annotations

import importlib
from importlib import metadata
from typing import TYPE_CHECKING, Any

try:
    __version__ = metadata.version("lora-dpo")
except metadata.PackageNotFoundError:  # a source checkout that was never installed
    __version__ = "0.1.0"

# Public name -> the module that defines it, imported when the name is first used.
_EXPORTS = {
    "Config": "lora_dpo.config",
    "load_config": "lora_dpo.config",
    "build_cache": "lora_dpo.cache",
    "ReferenceCache": "lora_dpo.cache",
    "preference_loss": "lora_dpo.losses",
    "sequence_logps": "lora_dpo.logps",
}

# Spelled out for static tools; tests/test_package.py resolves every name.
__all__ = [
    "Config",
    "ReferenceCache",
    "__version__",
    "build_cache",
    "load_config",
    "preference_loss",
    "sequence_logps",
]

if TYPE_CHECKING:
    from lora_dpo.cache import ReferenceCache, build_cache
    from lora_dpo.config import Config, load_config
    from lora_dpo.logps import sequence_logps
    from lora_dpo.losses import preference_loss


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'lora_dpo' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this hook
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
