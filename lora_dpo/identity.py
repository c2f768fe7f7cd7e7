"""Old import path of two lora_dpo.cache names, for `lora-dpo eval` until it imports them there."""

from lora_dpo.cache import open_checked_cache, policy_precision

__all__ = ["open_checked_cache", "policy_precision"]
