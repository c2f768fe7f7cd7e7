"""The package's face: `import lora_dpo` is light, and every public name resolves."""

from __future__ import annotations

import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

import lora_dpo

ROOT = Path(__file__).resolve().parents[1]


def test_importing_the_package_and_the_command_does_not_import_torch():
    script = (
        "import sys, lora_dpo, lora_dpo.cli, lora_dpo.arguments; lora_dpo.arguments.build_parser(); "
        "print(sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules))"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_every_public_name_resolves_to_its_home():
    from lora_dpo.cache import ReferenceCache, build_cache
    from lora_dpo.config import Config, load_config
    from lora_dpo.logps import sequence_logps
    from lora_dpo.losses import preference_loss

    homes = {
        "Config": Config,
        "load_config": load_config,
        "build_cache": build_cache,
        "ReferenceCache": ReferenceCache,
        "preference_loss": preference_loss,
        "sequence_logps": sequence_logps,
    }
    assert set(lora_dpo.__all__) == {"__version__", *homes}
    for name, value in homes.items():
        assert getattr(lora_dpo, name) is value, name
    assert set(lora_dpo.__all__) <= set(dir(lora_dpo))
    assert lora_dpo.__version__ == metadata.version("lora-dpo")
    with pytest.raises(AttributeError, match="no attribute 'no_such_name'"):
        lora_dpo.no_such_name  # noqa: B018


def test_submodules_keep_their_names():
    """`lora_dpo.train` and `lora_dpo.merge` are the modules, whatever was imported first."""
    import lora_dpo.merge
    import lora_dpo.train

    assert lora_dpo.train.__name__ == "lora_dpo.train" and callable(lora_dpo.train.train)
    assert lora_dpo.merge.__name__ == "lora_dpo.merge" and callable(lora_dpo.merge.merge)
