"""DPO loss variants: hand-derived values, TRL's formulas re-derived independently, and training.

The shared three-pair example (β = 0.5), with Δw = πθ(yw) - πref(yw), Δl likewise, z = Δw - Δl:

    pair 1: policy (-10, -12), ref (-11, -11): Δw = 1,  Δl = -1, z = 2,  βz = 1
    pair 2: policy (-5, -5),   ref (-5, -5):   Δw = 0,  Δl = 0,  z = 0,  βz = 0
    pair 3: policy (-20, -8),  ref (-16, -10): Δw = -4, Δl = 2,  z = -6, βz = -3

softplus(-1) = log(1 + e^-1) = 0.3132616875, softplus(0) = ln 2 = 0.6931471806,
softplus(3) = log(1 + e^3) = 3.0485873516; and softplus(x) - softplus(-x) = x.
"""

from __future__ import annotations

import logging
import math

import pytest
import torch

from lora_dpo.config import dump_config, load_config
from lora_dpo.demo import demo_config
from lora_dpo.errors import ConfigError
from lora_dpo.losses import (
    dpo_loss,
    hinge_loss,
    ipo_loss,
    preference_loss,
    robust_dpo_loss,
    rpo_nll_term,
)
from lora_dpo.train import train
from precompute import precompute_reference

F64 = torch.float64


def example():
    return dict(
        policy_chosen=torch.tensor([-10.0, -5.0, -20.0], dtype=F64),
        policy_rejected=torch.tensor([-12.0, -5.0, -8.0], dtype=F64),
        ref_chosen=torch.tensor([-11.0, -5.0, -16.0], dtype=F64),
        ref_rejected=torch.tensor([-11.0, -5.0, -10.0], dtype=F64),
    )


def close(actual, expected):
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=F64), rtol=0, atol=1e-9)


# ---- hand-derived values --------------------------------------------------------------------


def test_cdpo_label_smoothing_hand_derived():
    """ε = 0.1: L = 0.9·softplus(-βz) + 0.1·softplus(βz) = softplus(-βz) + ε·βz

    pair 1: 0.3132616875 + 0.1·1    = 0.4132616875
    pair 2: 0.6931471806 + 0        = 0.6931471806
    pair 3: 3.0485873516 + 0.1·(-3) = 2.7485873516
    """
    out = dpo_loss(**example(), beta=0.5, label_smoothing=0.1)
    close(out.losses, [0.4132616875, 0.6931471806, 2.7485873516])
    close(out.chosen_rewards, [0.5, 0.0, -2.0])
    close(out.rejected_rewards, [-0.5, 0.0, 1.0])


def test_robust_hand_derived():
    """ε = 0.1: L = [0.9·softplus(-βz) - 0.1·softplus(βz)] / 0.8 = softplus(-βz) - ε·βz/(1-2ε)

    pair 1: 0.3132616875 - 0.1·1/0.8    = 0.1882616875
    pair 2: 0.6931471806 - 0            = 0.6931471806
    pair 3: 3.0485873516 + 0.1·3/0.8    = 3.4235873516
    """
    out = robust_dpo_loss(**example(), beta=0.5, label_smoothing=0.1)
    close(out.losses, [0.1882616875, 0.6931471806, 3.4235873516])
    close(out.chosen_rewards, [0.5, 0.0, -2.0])


def test_robust_without_noise_is_dpo():
    ex = example()
    torch.testing.assert_close(
        robust_dpo_loss(**ex, beta=0.5, label_smoothing=0.0).losses, dpo_loss(**ex, beta=0.5).losses
    )


def test_hinge_hand_derived():
    """L = max(0, 1 - βz): pair 1: max(0, 1-1) = 0; pair 2: 1; pair 3: max(0, 1+3) = 4."""
    out = hinge_loss(**example(), beta=0.5)
    close(out.losses, [0.0, 1.0, 4.0])
    close(out.rejected_rewards, [-0.5, 0.0, 1.0])


def test_ipo_hand_derived():
    """Token counts chosen (2, 4, 4), rejected (4, 4, 2); β = 0.5, so the target 1/(2β) = 1.
    The loss is length-normalised; the rewards are not: β·Δ summed, as for every variant.

    pair 1: Δw/|yw| = 1/2,  Δl/|yl| = -1/4, h = 0.75, L = (0.75 - 1)² = 0.0625
            rewards β·Δ: 0.5·1 = 0.5, 0.5·(-1) = -0.5
    pair 2: h = 0,  L = (0 - 1)² = 1;  rewards 0, 0
    pair 3: Δw/|yw| = -4/4 = -1, Δl/|yl| = 2/2 = 1, h = -2, L = (-2 - 1)² = 9
            rewards 0.5·(-4) = -2, 0.5·2 = 1
    """
    out = ipo_loss(
        **example(), beta=0.5, chosen_tokens=torch.tensor([2, 4, 4]), rejected_tokens=torch.tensor([4, 4, 2])
    )
    close(out.losses, [0.0625, 1.0, 9.0])
    close(out.chosen_rewards, [0.5, 0.0, -2.0])
    close(out.rejected_rewards, [-0.5, 0.0, 1.0])


def test_rpo_term_hand_derived():
    """α = 0.5, chosen log-probs (-10, -5, -20) over (2, 4, 4) tokens: the batch's chosen NLL
    per token is 35/10 = 3.5, so the loss gains α·3.5 = 1.75 on average. Shared out per pair:
    α·B·(-log π)/Σ|yw| = 0.5·3·(10, 5, 20)/10 = (1.5, 0.75, 3.0), whose mean is 1.75."""
    ex = example()
    tokens = torch.tensor([2, 4, 4])
    term = rpo_nll_term(ex["policy_chosen"], tokens, alpha=0.5)
    close(term, [1.5, 0.75, 3.0])
    out = preference_loss(**ex, beta=0.5, rpo_alpha=0.5, chosen_tokens=tokens, rejected_tokens=tokens)
    close(out.losses, [0.3132616875 + 1.5, 0.6931471806 + 0.75, 3.0485873516 + 3.0])
    assert out.losses.mean().item() == pytest.approx(dpo_loss(**ex, beta=0.5).losses.mean().item() + 1.75)


def test_rpo_term_carries_the_nll_gradient():
    """d(mean term)/d(log π(yw_i)) = -α/Σ|yw| for every pair: a per-token NLL gradient."""
    policy_chosen = torch.tensor([-10.0, -5.0, -20.0], dtype=F64, requires_grad=True)
    tokens = torch.tensor([2, 4, 4])
    rpo_nll_term(policy_chosen, tokens, alpha=0.5).mean().backward()
    close(policy_chosen.grad, [-0.05, -0.05, -0.05])


def test_every_variant_is_a_function_of_the_margin_at_init():
    """Policy == reference (z = 0): sigmoid, cDPO and robust give ln 2, hinge 1, IPO 1/(2β)²."""
    logps, other = torch.randn(8, dtype=F64) * 30, torch.randn(8, dtype=F64) * 30
    tokens = torch.randint(1, 50, (8,))
    expected = {
        ("sigmoid", 0.0): math.log(2),
        ("sigmoid", 0.3): math.log(2),
        ("robust", 0.3): math.log(2),
        ("hinge", 0.0): 1.0,
        ("ipo", 0.0): 1 / (2 * 0.2) ** 2,
    }
    for (loss_type, eps), value in expected.items():
        out = preference_loss(
            logps,
            other,
            logps.clone(),
            other.clone(),
            0.2,
            loss_type=loss_type,
            label_smoothing=eps,
            chosen_tokens=tokens,
            rejected_tokens=tokens,
        )
        torch.testing.assert_close(out.losses, torch.full((8,), value, dtype=F64), rtol=0, atol=1e-12)
        assert torch.all(out.chosen_rewards == 0) and torch.all(out.rejected_rewards == 0)


def test_large_margins_stay_finite():
    big = torch.tensor([1e4, -1e4])
    for loss_type, eps in (("sigmoid", 0.1), ("robust", 0.1), ("hinge", 0.0)):
        out = preference_loss(
            big, -big, torch.zeros(2), torch.zeros(2), 1.0, loss_type=loss_type, label_smoothing=eps
        )
        assert torch.isfinite(out.losses).all(), loss_type


# ---- TRL's formulas, re-derived from its DPO trainer, on random inputs -----------------------


def trl_style(loss_type, pc, pr, rc, rr, beta, eps, nc, nr, token_logps, mask):
    """TRL's `dpo_loss` and its rpo term, written the long way in float64 with plain
    σ and log (no softplus/logsigmoid). For `ipo` TRL divides every sequence log-prob
    (policy and reference) by its completion length before forming the logits. Its RPO
    `nll_loss` is cross-entropy over the chosen completion tokens of the batch, i.e. minus
    the mean per-token log-prob, added to every pair's loss before the batch mean."""
    if loss_type == "ipo":
        pc, pr, rc, rr = pc / nc, pr / nr, rc / nc, rr / nr
    logits = (pc - pr) - (rc - rr)
    sig = lambda x: 1 / (1 + torch.exp(-x))  # noqa: E731
    if loss_type == "sigmoid":
        losses = -torch.log(sig(beta * logits)) * (1 - eps) - torch.log(sig(-beta * logits)) * eps
    elif loss_type == "robust":
        losses = (-torch.log(sig(beta * logits)) * (1 - eps) + torch.log(sig(-beta * logits)) * eps) / (
            1 - 2 * eps
        )
    elif loss_type == "hinge":
        losses = torch.clamp(1 - beta * logits, min=0)
    else:
        losses = (logits - 1 / (2 * beta)) ** 2
    nll = -(token_logps * mask).sum() / mask.sum()
    return losses, nll


@pytest.mark.parametrize(
    "loss_type, eps", [("sigmoid", 0.0), ("sigmoid", 0.25), ("robust", 0.25), ("hinge", 0.0), ("ipo", 0.0)]
)
@pytest.mark.parametrize("beta", [0.05, 0.5])
def test_equals_trl_formula_on_random_inputs(loss_type, eps, beta):
    gen = torch.Generator().manual_seed(hash((loss_type, eps, beta)) % 2**31)
    B, T = 6, 12
    # Per-token log-probs and response masks, so the sums and counts are consistent.
    token_logps = -torch.rand(4, B, T, generator=gen, dtype=F64) * 3  # policy c/r, ref c/r
    lengths = torch.randint(1, T + 1, (2, B), generator=gen)
    masks = (torch.arange(T)[None, None, :] < lengths[:, :, None]).to(F64)  # [2, B, T] chosen/rejected
    pc, pr = (token_logps[0] * masks[0]).sum(-1), (token_logps[1] * masks[1]).sum(-1)
    rc, rr = (token_logps[2] * masks[0]).sum(-1), (token_logps[3] * masks[1]).sum(-1)
    nc, nr = lengths[0], lengths[1]

    expected, nll = trl_style(loss_type, pc, pr, rc, rr, beta, eps, nc, nr, token_logps[0], masks[0])
    out = preference_loss(
        pc, pr, rc, rr, beta, loss_type=loss_type, label_smoothing=eps, chosen_tokens=nc, rejected_tokens=nr
    )
    torch.testing.assert_close(out.losses, expected, rtol=1e-10, atol=1e-10)
    # The rewards are β·(summed log-ratio) for every variant, IPO included (TRL's IPO rewards
    # are per token; here the length normalisation stays inside the loss).
    torch.testing.assert_close(out.chosen_rewards, beta * (pc - rc), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.rejected_rewards, beta * (pr - rr), rtol=1e-12, atol=1e-12)

    alpha = 0.7
    with_rpo = preference_loss(
        pc,
        pr,
        rc,
        rr,
        beta,
        loss_type=loss_type,
        label_smoothing=eps,
        rpo_alpha=alpha,
        chosen_tokens=nc,
        rejected_tokens=nr,
    )
    # TRL: losses + rpo_alpha * nll_loss, then the batch mean.
    torch.testing.assert_close(
        with_rpo.losses.mean(), (expected + alpha * nll).mean(), rtol=1e-10, atol=1e-10
    )


# ---- config -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["train.loss_type=dpo"], r"train.loss_type='dpo': must be one of sigmoid, ipo, hinge, robust"),
        (["train.label_smoothing=0.5"], r"train.label_smoothing=0.5: must be in \[0, 0.5\)"),
        (["train.label_smoothing=-0.1"], r"must be in \[0, 0.5\)"),
        (["train.loss_type=ipo", "train.label_smoothing=0.1"], r"has no effect with train.loss_type=ipo"),
        (["train.rpo_alpha=-1"], r"train.rpo_alpha=-1.0: must be >= 0"),
    ],
)
def test_bad_loss_settings_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_loss_settings_load():
    config = load_config(None, ["train.loss_type=robust", "train.label_smoothing=0.1", "train.rpo_alpha=1"])
    assert (config.train.loss_type, config.train.label_smoothing, config.train.rpo_alpha) == (
        "robust",
        0.1,
        1.0,
    )


# ---- each variant trains the demo task ------------------------------------------------------

PAIRS = 40


@pytest.fixture(scope="module")
def variants_workdir(demo_workdir):
    config = demo_config(demo_workdir)
    config.data.max_pairs = PAIRS
    config.precompute.cache_dir = str(demo_workdir / "cache-variants")
    precompute_reference(config)
    return demo_workdir


@pytest.fixture(scope="module")
def ld_cache(variants_workdir):
    """The same pairs' cache built for LD-DPO: precompute-ref with train.ld_alpha < 1 also stores
    each response's shared-prefix log-probs."""
    config = demo_config(variants_workdir)
    config.data.max_pairs = PAIRS
    config.precompute.cache_dir = str(variants_workdir / "cache-ld")
    config.train.ld_alpha = 0.5
    config.validate()
    precompute_reference(config)
    return variants_workdir / "cache-ld"


# (settings, the step-1 loss: every pair has z = 0 before the first update, so each loss type
# starts at its value at z = 0; None where it is not a function of z alone, see the test).
# β = 0.1 unless set. A few settings differ from the defaults so that 5 to 10 steps suffice:
# DiscoPOP at the paper's τ = 0.05 has a local maximum at βz = +0.07 and a local minimum at
# βz = -0.12, so from policy = reference its gradient pushes every margin negative; τ = 0.2
# starts downhill. MPO's SFT term outweighs its preference terms at β = 0.1.
EXO_EPS = 1e-3
VARIANTS = {
    "cdpo": (dict(loss_type="sigmoid", label_smoothing=0.2), math.log(2)),
    "ipo": (dict(loss_type="ipo"), 1 / (2 * 0.1) ** 2),
    "hinge": (dict(loss_type="hinge"), 1.0),
    "robust": (dict(loss_type="robust", label_smoothing=0.2), math.log(2)),
    "rpo": (dict(loss_type="sigmoid", rpo_alpha=0.5), None),  # ln 2 + the chosen NLL
    # q = ½: log ½ - ½·log(ε(1-ε))
    "exo_pair": (
        dict(loss_type="exo_pair", label_smoothing=EXO_EPS),
        math.log(0.5) - 0.5 * math.log(EXO_EPS * (1 - EXO_EPS)),
    ),
    "nca_pair": (dict(loss_type="nca_pair"), 2 * math.log(2)),
    "bco_pair": (dict(loss_type="bco_pair"), 2 * math.log(2)),
    "sppo_hard": (dict(loss_type="sppo_hard"), 2 * (1 / (2 * 0.1)) ** 2),
    "aot": (dict(loss_type="aot"), math.log(2)),
    "aot_unpaired": (dict(loss_type="aot_unpaired"), math.log(2)),
    "apo_zero": (dict(loss_type="apo_zero"), 1.0),
    "apo_down": (dict(loss_type="apo_down"), 1.0),
    "discopop": (dict(loss_type="discopop", discopop_tau=0.2), 0.5 * math.log(2) + 0.5),
    "sigmoid_norm": (dict(loss_type="sigmoid_norm"), math.log(2)),
    "mpo": (dict(loss_type="sigmoid+bco_pair+sft", loss_weights=[0.8, 0.2, 1.0], beta=0.5), None),
    "wpo": (dict(loss_type="sigmoid", use_weighting=True), None),  # ln 2 times each pair's weight
    # Policy = reference on the shared prefix and the tail alike: z = 0 under LD-DPO's weighting.
    "ld_dpo": (dict(loss_type="sigmoid", ld_alpha=0.5), math.log(2)),
    "forward_kl": (dict(loss_type="sigmoid", f_divergence_type="forward_kl"), math.log(2)),
    "js_divergence": (dict(loss_type="sigmoid", f_divergence_type="js_divergence"), math.log(2)),
    "alpha_divergence": (
        dict(loss_type="sigmoid", f_divergence_type="alpha_divergence", f_alpha_divergence_coef=0.5),
        math.log(2),
    ),
    # Reference-free: no cache (the test points precompute.cache_dir at nothing), their own rewards.
    "simpo": (dict(loss_type="simpo", beta=2.5, epochs=2, max_steps=10), None),
    "cpo": (dict(loss_type="cpo", beta=0.5, cpo_alpha=0.2, epochs=2, max_steps=10), None),
    "orpo": (dict(loss_type="orpo", beta=3.0, epochs=2, max_steps=10), None),
}
# Losses whose step-1 value holds the chosen NLL per token: several nats on a random tiny model.
WITH_NLL = ("rpo", "mpo", "cpo", "orpo")
REFERENCE_FREE = ("simpo", "cpo", "orpo")


def variant_config(workdir, tmp_path, settings):
    config = demo_config(workdir)
    config.data.max_pairs = PAIRS
    config.precompute.cache_dir = str(workdir / "cache-variants")
    config.train.output_dir = str(tmp_path / "run")
    config.train.max_steps = 5
    config.train.logging_steps = 1
    config.train.generate_every = 0  # samples say nothing about the loss; they cost time
    for key, value in settings.items():
        setattr(config.train, key, value)
    config.validate()
    return config


@pytest.mark.parametrize("name", list(VARIANTS))
def test_variant_trains_the_demo_task(name, variants_workdir, tmp_path, caplog, request):
    settings, step1_loss = VARIANTS[name]
    config = variant_config(variants_workdir, tmp_path, settings)
    absent = tmp_path / "no-cache"
    if name in REFERENCE_FREE:
        config.precompute.cache_dir = str(absent)
    if config.train.ld_alpha != 1.0:
        config.precompute.cache_dir = str(request.getfixturevalue("ld_cache"))
    with caplog.at_level(logging.INFO, logger="lora_dpo"):
        result = train(config)

    first = result.history[0]
    before, after = result.eval_before, result.eval_after
    if step1_loss is not None:  # the configured variant is the one that ran, in train and eval
        assert first["loss"] == pytest.approx(step1_loss, abs=1e-5)
        assert before.loss == pytest.approx(step1_loss, abs=1e-5)
    elif name in WITH_NLL:  # the chosen NLL per token, several nats on a random tiny model
        assert first["loss"] > math.log(2) + 1.0
        assert before.loss > math.log(2) + 1.0
    elif name == "wpo":  # ln 2 scaled by each pair's weight: below 1 on the random tiny model
        assert 0 < first["loss"] < math.log(2) and 0 < before.loss < math.log(2)
    notices = [r.message for r in caplog.records if "reference-free" in r.message]
    if name in REFERENCE_FREE:  # no cache opened, none made, and said once
        assert not absent.exists()
        assert notices == [
            f"train.loss_type={name} is reference-free: no reference cache is read "
            "(precompute.cache_dir is ignored)"
        ]
        assert before.chosen_logratio is None and "eval/logratio/chosen" not in after.to_dict()
        report = (result.output_dir / "report.md").read_text()
        assert report.count("not judged: a reference-free objective's rewards are not log-ratios") == 2
        assert f"None read: train.loss_type={name} is reference-free." in report
    else:
        assert notices == []
    assert after.reward_accuracy >= 0.8, (before, after)
    assert after.reward_accuracy > before.reward_accuracy + 0.25, (before, after)
    assert after.reward_margin > 0


def test_sft_alone_raises_the_chosen_likelihood(variants_workdir, tmp_path):
    """`sft` is a term to combine (MPO above), not a preference loss: alone it lowers the
    held-out chosen NLL and makes the chosen responses likelier than under the reference,
    which lifts the reward accuracy above chance but not to the preference losses' 0.8."""
    result = train(variant_config(variants_workdir, tmp_path, dict(loss_type="sft")))
    before, after = result.eval_before, result.eval_after
    assert result.history[0]["loss"] > math.log(2) + 1.0  # the chosen NLL per token
    assert after.loss < before.loss
    assert after.chosen_logratio > 0
    assert after.reward_accuracy > 0.6


def test_ld_dpo_cache_holds_each_responses_shared_prefix(variants_workdir, ld_cache, tiny_tokenizer):
    """The stored prefix is the first min(|yw|, |yl|) tokens: the shorter response's whole
    log-prob, strictly more than the longer one's (its tail's log-probs are < 0)."""
    from lora_dpo.cache import ReferenceCache
    from lora_dpo.data import load_preference_data

    config = demo_config(variants_workdir)
    config.data.max_pairs = PAIRS
    pairs, _ = load_preference_data(config.data, tiny_tokenizer, "train")
    values = ReferenceCache(ld_cache, shared_prefix=True).aligned(pairs, "train")
    chosen_shared, rejected_shared = values.shared_prefix
    longer = values.chosen_tokens > values.rejected_tokens
    shorter = values.chosen_tokens < values.rejected_tokens
    assert longer.any() and shorter.any()
    assert torch.all(chosen_shared[longer] > values.chosen_logps[longer])
    assert torch.equal(rejected_shared[longer], values.rejected_logps[longer])
    assert torch.equal(chosen_shared[shorter], values.chosen_logps[shorter])
    assert torch.all(rejected_shared[shorter] > values.rejected_logps[shorter])
    assert (
        ReferenceCache(variants_workdir / "cache-variants", shared_prefix=True).shared_prefix[0].isnan().all()
    )


def test_ld_dpo_on_a_cache_without_the_statistic_names_the_rebuild(variants_workdir, tmp_path, capsys):
    """The cache built for the other variants has no shared-prefix values: one line, which
    command rebuilds it, before any training."""
    from lora_dpo.cli import main

    config = variant_config(variants_workdir, tmp_path, dict(ld_alpha=0.5))
    config_file = tmp_path / "config.yaml"
    config_file.write_text(dump_config(config))
    assert main(["train", "--config", str(config_file)]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith(
        f"error: {variants_workdir / 'cache-variants'}: {PAIRS} of {PAIRS} train pairs lack "
        "the shared-prefix reference log-probs that train.ld_alpha < 1 reads"
    ), lines
    assert lines[0].endswith("rebuild the cache with precompute-ref --rebuild and this train.ld_alpha"), lines
    assert not (tmp_path / "run" / "adapter").exists()
