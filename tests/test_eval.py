"""Held-out eval scores pairs with the configured loss and training's metric names; its values
are recomputed here from the policy's and the cache's log-probs with each loss written out."""

from __future__ import annotations

import math

import pytest
import torch

from lora_dpo.batching import batch_tokens, collate, pad_id_of
from lora_dpo.cache import ReferenceCache
from lora_dpo.data import load_preference_data
from lora_dpo.demo import demo_config
from lora_dpo.evaluate import PAIR_SCORE_FIELDS, evaluate, evaluate_run, in_pair_order
from lora_dpo.logps import sequence_logps
from lora_dpo.losses import LossSettings
from lora_dpo.metrics import PAIR_METRICS
from lora_dpo.model import attach_lora, load_base_model, load_tokenizer
from lora_dpo.rank_work import balanced_assignment
from lora_dpo.scoring import score_pairs, scoring_batches
from policies import move_lora_b_off_zero
from precompute import precompute_reference

CPU = torch.device("cpu")
BETA = 0.1


def eval_config(workdir):
    config = demo_config(workdir)
    config.data.max_pairs = 48  # of each split
    config.precompute.cache_dir = str(workdir / "cache-eval")
    return config


@pytest.fixture(scope="module")
def eval_setup(demo_workdir):
    """A reference cache, the eval pairs, and a LoRA policy moved away from the reference."""
    config = eval_config(demo_workdir)
    precompute_reference(config)
    tokenizer = load_tokenizer(config.model)
    pairs, _ = load_preference_data(config.data, tokenizer, "eval")
    base = load_base_model(config.model, quantize=True, dtype=torch.float32, device=CPU)
    torch.manual_seed(0)
    policy = attach_lora(base, config.lora, gradient_checkpointing=False)
    move_lora_b_off_zero(policy)  # the policy differs from the reference
    cache = ReferenceCache(config.precompute.cache_dir)
    return config, pairs, cache, policy, pad_id_of(tokenizer)


def expected_losses(settings: LossSettings, pc, pr, rc, rr, nc, nr) -> torch.Tensor:
    """Each objective the long way, float64, on the whole eval set as one batch."""
    beta, eps = settings.beta, settings.label_smoothing
    z = beta * ((pc - rc) - (pr - rr))
    sigma = lambda x: 1 / (1 + torch.exp(-x))  # noqa: E731
    if settings.loss_type == "sigmoid":
        losses = -(1 - eps) * torch.log(sigma(z)) - eps * torch.log(sigma(-z))
    elif settings.loss_type == "hinge":
        losses = torch.clamp(1 - z, min=0)
    else:  # ipo
        losses = ((pc - rc) / nc - (pr - rr) / nr - 1 / (2 * beta)) ** 2
    nll_per_token = -pc.sum() / nc.sum()
    return losses + settings.rpo_alpha * nll_per_token


@pytest.mark.parametrize(
    "settings",
    [
        LossSettings(BETA),
        LossSettings(BETA, "sigmoid", label_smoothing=0.2),
        LossSettings(BETA, "ipo"),
        LossSettings(BETA, "hinge"),
        LossSettings(BETA, "sigmoid", rpo_alpha=0.5),
    ],
    ids=["sigmoid", "cdpo", "ipo", "hinge", "rpo"],
)
def test_eval_uses_the_configured_loss_and_training_names(eval_setup, settings):
    config, pairs, cache, policy, pad_id = eval_setup
    metrics = evaluate(
        policy, pairs, cache.aligned(pairs, "eval"), settings, pad_id, batch_size=len(pairs), device=CPU
    )

    # The reference computation: one forward over all pairs, the cache, each formula by hand.
    batch = collate(pairs, pad_id)
    with torch.no_grad():
        policy.eval()
        out = sequence_logps(policy, batch)
    pc, pr = out.chosen.double(), out.rejected.double()
    nc, nr = out.chosen_tokens.double(), out.rejected_tokens.double()
    rows = [cache.row_of[h] for h in batch.pair_hashes]  # by content hash, not through `aligned`
    rc, rr = cache.chosen_logps[rows].double(), cache.rejected_logps[rows].double()
    chosen_rewards, rejected_rewards = BETA * (pc - rc), BETA * (pr - rr)  # summed, for every loss
    margins = chosen_rewards - rejected_rewards
    preference = pc / nc - pr / nr
    expected = {
        "eval/loss": expected_losses(settings, pc, pr, rc, rr, nc, nr).mean(),
        "eval/rewards/chosen": chosen_rewards.mean(),
        "eval/rewards/rejected": rejected_rewards.mean(),
        "eval/rewards/accuracies": (margins > 0).double().mean(),
        "eval/rewards/margins": margins.mean(),
        "eval/logps/chosen": pc.mean(),
        "eval/logps/rejected": pr.mean(),
        "eval/preference_accuracy": (preference > 0).double().mean(),
        "eval/logratio/chosen": (pc - rc).mean(),
    }
    values = metrics.to_dict()
    assert set(values) == {"eval/" + name for name in PAIR_METRICS} | {
        "eval/preference_accuracy",
        "eval/logratio/chosen",
    }
    assert (margins != 0).all() and 0.05 < expected["eval/rewards/accuracies"] < 0.95  # not trivial
    for name, value in expected.items():
        assert values[name] == pytest.approx(value.item(), rel=1e-5, abs=1e-6), name
    assert metrics.pairs == len(pairs) == 48
    assert (metrics.loss, metrics.reward_margin) == (values["eval/loss"], values["eval/rewards/margins"])


def test_eval_batches_do_not_change_the_values(eval_setup):
    """Eval in small length-sorted batches gives the one-batch means (the loss without RPO is
    per pair, so batching cannot move it)."""
    config, pairs, cache, policy, pad_id = eval_setup
    settings = LossSettings(BETA, "ipo")
    reference = cache.aligned(pairs, "eval")
    whole = evaluate(policy, pairs, reference, settings, pad_id, batch_size=len(pairs), device=CPU).to_dict()
    batched = evaluate(policy, pairs, reference, settings, pad_id, batch_size=5, device=CPU).to_dict()
    for name, value in whole.items():
        assert batched[name] == pytest.approx(value, rel=1e-5, abs=1e-6), name


@pytest.mark.parametrize("loss_type, at_reference", [("sigmoid", math.log(2)), ("ipo", 1 / (2 * BETA) ** 2)])
def test_eval_command_scores_with_the_train_loss(demo_workdir, eval_setup, loss_type, at_reference):
    """`lora-dpo eval` on the bare base (the reference itself): the loss is the configured
    objective's value at z = 0, and the rewards are 0."""
    config = eval_config(demo_workdir)
    config.train.loss_type = loss_type
    values = evaluate_run(config, None).to_dict()
    assert values["eval/loss"] == pytest.approx(at_reference, abs=1e-4)
    for name in ("eval/rewards/chosen", "eval/rewards/margins", "eval/logratio/chosen"):
        assert values[name] == pytest.approx(0.0, abs=1e-5), name


@pytest.mark.parametrize("ranks", [2, 3, 5])
def test_batches_scored_on_several_ranks_give_the_one_process_rows(eval_setup, ranks):
    """What each rank of a torchrun eval scores (its share of the one-process batches, dealt by
    tokens), placed back in pair order, is the one-process scoring bit for bit, the [2N]
    statistics included; a rank dealt nothing adds nothing."""
    config, pairs, cache, policy, pad_id = eval_setup
    policy.eval()
    batches = scoring_batches(pairs, 7, "padded")
    statistics = {"shared_prefix": True, "log_sum_sq_probs": True}

    def scored(chosen_batches):
        return score_pairs(
            policy, pairs, batch_size=7, pad_id=pad_id, device=CPU, batches=chosen_batches, **statistics
        )

    whole = scored(None)  # one process: scoring_batches itself
    tokens = [batch_tokens("padded", [pairs[i] for i in batch]) for batch in batches]
    shares = balanced_assignment(tokens, ranks)
    parts = [(share, scored([batches[k] for k in share])) for share in shares]
    assert all(len(share) < len(batches) for share in shares)  # the work was split
    placed = in_pair_order(parts[::-1] + [([], None)], batches, len(pairs))  # any gather order
    for name in PAIR_SCORE_FIELDS:
        assert getattr(whole, name) is not None, name
        assert torch.equal(getattr(placed, name), getattr(whole, name)), name
