"""`lora-dpo demo` and the local fixtures it is built from, which the tests use too: the
preference task (`task`), a byte-level BPE tokenizer trained in seconds (`tokenizer`) and
random tiny models of four architectures (`models`), and the short supervised step that
teaches the demo's model the task's format (`sft`). Nothing here downloads anything."""

from lora_dpo.demo.run import DemoResult, demo_config, prepare, run_demo

__all__ = ["DemoResult", "demo_config", "prepare", "run_demo"]
