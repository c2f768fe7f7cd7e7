"""What a training run reads: data, the checked reference cache, then the base model, in that
order (a data or cache problem costs seconds, not a model load). A sweep loads it once."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from lora_dpo.adapter_start import read_start_adapter
from lora_dpo.cache import ReferenceCache, ReferenceValues, open_checked_cache, policy_precision
from lora_dpo.config import Config
from lora_dpo.data import DataReport, TokenizedPair, labels_of, load_preference_data
from lora_dpo.errors import ConfigError
from lora_dpo.losses import LossSettings
from lora_dpo.losses.kto import weight_advice
from lora_dpo.model import default_device, load_base_at, load_tokenizer, resolve_model_dir
from lora_dpo.optim import optimizer_name

log = logging.getLogger(__name__)


@dataclass
class RunInputs:
    """What a training run reads besides its `train` settings; a sweep loads it once."""

    tokenizer: Any
    pairs: list[TokenizedPair]
    eval_pairs: list[TokenizedPair]
    data_report: DataReport
    # None for a reference-free objective (simpo, orpo, cpo): no cache is read
    cache: ReferenceCache | None
    reference: ReferenceValues | None  # aligned with `pairs`
    eval_reference: ReferenceValues | None  # aligned with `eval_pairs`
    base: torch.nn.Module  # the frozen (4-bit) base, without adapters
    device: torch.device


def load_run_inputs(config: Config, objectives: Sequence[LossSettings] = ()) -> RunInputs:
    """Data, the checked reference cache, then the base model. The cache is read as the
    objectives need it (default: the config's; a sweep names all of its runs'): not at all when
    none reads a reference, with the shared-prefix log-probs when one is LD-DPO."""
    objectives = objectives or [LossSettings.of(config.train)]
    with_reference = not all(objective.reference_free for objective in objectives)
    if not with_reference:
        log.info(
            "train.loss_type=%s is reference-free: no reference cache is read (precompute.cache_dir is ignored)",
            config.train.loss_type,
        )
    device = default_device()
    optimizer_name(config.train, device)  # an impossible optimizer costs nothing to find out
    read_start_adapter(config.model)  # so does a bad model.adapter_path
    precision = policy_precision(config, device)
    unpaired = objectives[0].unpaired  # KTO reads unpaired rows (lora_dpo.data.unpaired)
    if any(objective.unpaired != unpaired for objective in objectives):
        raise ConfigError("a sweep cannot mix train.loss_type=kto (unpaired rows) with preference pairs")
    # Data and reference values first: a cache problem should cost seconds, not a model load.
    tokenizer = load_tokenizer(config.model)
    pairs, report = load_preference_data(config.data, tokenizer, "train", unpaired=unpaired)
    log.info("train data: %s", report.summary())
    if unpaired:
        labels = labels_of(pairs)
        desirable = int(labels.sum()) if labels is not None else 0
        kto = objectives[0]
        advice = weight_advice(
            desirable, len(pairs) - desirable, kto.desirable_weight, kto.undesirable_weight
        )
        if advice:
            log.warning("%s", advice)
    eval_pairs = (
        load_preference_data(config.data, tokenizer, "eval", unpaired=unpaired)[0]
        if config.data.eval_path
        else []
    )

    def load_base() -> torch.nn.Module:
        return load_base_at(config.model, precision, device)

    # A hub model not downloaded yet has no weights to fingerprint before it is loaded.
    base = None if resolve_model_dir(config.model) else load_base()
    cache = reference = eval_reference = None
    if with_reference:
        cache = open_checked_cache(
            config,
            tokenizer,
            precision,
            accept_mismatch=config.train.accept_cache_mismatch,
            shared_prefix=any(objective.needs_shared_prefix for objective in objectives),
        )
        cache.manifest.require_rows(unpaired, cache.cache_dir, config.train.loss_type)
        reference, eval_reference = cache.aligned(pairs, "train"), cache.aligned(eval_pairs, "eval")
    base = base or load_base()
    return RunInputs(tokenizer, pairs, eval_pairs, report, cache, reference, eval_reference, base, device)
