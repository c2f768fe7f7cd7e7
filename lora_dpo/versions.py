"""Versions of the packages that shape numbers, for manifests and `--version`."""

from __future__ import annotations

from importlib import metadata

KEY_PACKAGES = ("lora-dpo", "torch", "transformers", "peft", "bitsandbytes", "safetensors", "datasets")


def package_versions() -> dict[str, str]:
    versions = {}
    for name in KEY_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions
