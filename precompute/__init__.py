"""Stage 1: run the frozen reference model once and write the reference cache.

`python -m precompute --config C` is `lora-dpo precompute-ref`; `precompute_reference(config)`
builds the cache of a config in this process. The cache itself lives in `lora_dpo.cache`.
"""

from lora_dpo.cache import build_cache as precompute_reference

__all__ = ["precompute_reference"]
