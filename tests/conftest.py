"""Shared fixtures: a locally trained tokenizer and random tiny models saved like real checkpoints."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
warnings.filterwarnings("ignore", message=".*kernels.*")

SHARED_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"


@pytest.fixture(scope="session")
def demo_workdir(tmp_path_factory) -> Path:
    """The demo's data, tokenizer and tiny Llama, built once for the session."""
    from lora_dpo.demo import prepare

    workdir = tmp_path_factory.mktemp("demo")
    prepare(workdir)
    return workdir


@pytest.fixture(scope="session")
def tiny_tokenizer(demo_workdir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(demo_workdir / "model"))
