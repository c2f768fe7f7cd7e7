#!/usr/bin/env bash
# Type-check the typed core (every function annotated: see [tool.mypy] in pyproject.toml).
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/mypy -p lora_dpo.losses -p lora_dpo.logps -p lora_dpo.batching -p lora_dpo.fileio -p lora_dpo.cache -p lora_dpo.scoring -p lora_dpo.generate -p lora_dpo.judge -p lora_dpo.run -m lora_dpo.optim -m lora_dpo.checkpoint -m lora_dpo.faults -m lora_dpo.lockfile -m lora_dpo.dropout "$@"
