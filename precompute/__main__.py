"""`python -m precompute --config C [key=value ...]`: the same as `lora-dpo precompute-ref`."""

import sys

from lora_dpo.cli import main

if __name__ == "__main__":
    sys.exit(main(["precompute-ref", *sys.argv[1:]]))
