"""`lora-dpo demo` and the local fixtures it is built from, which the tests use too: the
preference task (`task`), a byte-level BPE tokenizer trained in seconds (`tokenizer`) and
random tiny models of four architectures (`models`). Nothing here downloads anything."""

from lora_dpo.demo.run import demo_config, prepare, run_demo

__all__ = ["demo_config", "prepare", "run_demo"]
