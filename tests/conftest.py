"""Shared fixtures: a locally trained tokenizer and random tiny models saved like real checkpoints."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tiny models gain nothing from intra-op threads, and on a busy 2-core machine threads of
# several processes thrash; subprocesses inherit the variable.
os.environ.setdefault("OMP_NUM_THREADS", "1")
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


@pytest.fixture(autouse=True, scope="session")
def _fingerprint_memo_in_tmp(tmp_path_factory):
    """Keep the weight-fingerprint memo out of the user's home during tests."""
    os.environ["LORA_DPO_CACHE_HOME"] = str(tmp_path_factory.mktemp("lora-dpo-home"))
