"""Loading a base model: a pickle payload in a weight file is refused in one line, unrun."""

import os
import pickle

import pytest
import torch
from transformers import AutoModelForCausalLM

from lora_dpo.config import ModelConfig
from lora_dpo.demo.models import tiny_config
from lora_dpo.errors import ConfigError
from lora_dpo.model import load_base_model


class _Payload:
    """Unpickling this runs code: it creates the file named by `marker`."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.mknod, (self.marker,))


def test_pickled_code_in_weights_is_one_line_and_never_runs(tmp_path):
    model_dir, marker = tmp_path / "model", tmp_path / "ran"
    AutoModelForCausalLM.from_config(tiny_config("llama", 64)).save_pretrained(model_dir)
    (model_dir / "model.safetensors").unlink()  # only the pickle is left to load
    with (model_dir / "pytorch_model.bin").open("wb") as handle:
        pickle.dump({"model.embed_tokens.weight": _Payload(str(marker))}, handle)
    with pytest.raises(ConfigError) as error:
        load_base_model(
            ModelConfig(name_or_path=str(model_dir)),
            quantize=False,
            dtype=torch.float32,
            device=torch.device("cpu"),
        )
    message = str(error.value)
    assert "\n" not in message and "pickled objects" in message and "weights_only" in message
    assert not marker.exists()
    # control: the same file loaded without the guard does run the payload
    with (model_dir / "pytorch_model.bin").open("rb") as handle:
        pickle.load(handle)
    assert marker.exists()
