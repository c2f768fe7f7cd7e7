"""KTO on unpaired rows: the loss by hand and as TRL computes it, the unpaired data formats and
the KL completions, the reference cache of unpaired rows, and the demo task trained with KTO.

The hand-worked example (β = 0.5, λD = 1, λU = 2), Δ = log πθ(y|x) - log πref(y|x), Δ' likewise
for the KL completion y':

    Δ' = (1, 2, 3): z0 = max(0, mean Δ') = 2
    row 1, desirable,   Δ = 2: 1 - σ(0.5·(2 - 2)) = 1 - σ(0) = 0.5
    row 2, desirable,   Δ = 4: 1 - σ(0.5·(4 - 2)) = 1 - σ(1) = 0.2689414214
    row 3, undesirable, Δ = 0: 2·(1 - σ(0.5·(2 - 0))) = 2·(1 - σ(1)) = 0.5378828427

with σ(1) = 1/(1 + e^-1) = 0.7310585786.
"""

from __future__ import annotations

import json

import pytest
import torch

from lora_dpo.cache import (
    Manifest,
    ReferenceCache,
    export_cache,
    import_cache,
    manifest_rows,
    merge_caches,
)
from lora_dpo.config import load_config
from lora_dpo.data import BAD_LABEL, UnpairedRow, build_unpaired_rows, load_preference_data
from lora_dpo.demo import demo_config
from lora_dpo.errors import CacheError, ConfigError, DataError
from lora_dpo.losses import KTOOutput, LossSettings, PairLogps, compute_loss, kto_loss
from lora_dpo.losses.kto import weight_advice
from lora_dpo.train import train
from precompute import precompute_reference

F64 = torch.float64


def example():
    return dict(
        policy_logps=torch.tensor([-10.0, -6.0, -20.0], dtype=F64),
        ref_logps=torch.tensor([-12.0, -10.0, -20.0], dtype=F64),
        policy_kl_logps=torch.tensor([-30.0, -28.0, -27.0], dtype=F64),
        ref_kl_logps=torch.tensor([-31.0, -30.0, -30.0], dtype=F64),
        labels=torch.tensor([True, True, False]),
    )


def close(actual, expected):
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=F64), rtol=0, atol=1e-9)


# ---- the loss by hand -----------------------------------------------------------------------


def test_kto_hand_derived():
    out = kto_loss(**example(), beta=0.5, desirable_weight=1.0, undesirable_weight=2.0)
    close(out.losses, [0.5, 0.2689414214, 0.5378828427])
    assert out.kl.item() == pytest.approx(2.0)
    close(out.chosen_rewards, [1.0, 2.0, 0.0])  # β·Δ
    close(out.rejected_rewards, [0.5, 1.0, 1.5])  # β·Δ'
    # accuracy: rewards against β·z0 = 1: row 1 on the point (½), row 2 above (1), row 3 below (1)
    close(out.accuracy(0.5), [0.5, 1.0, 1.0])


def test_kto_reference_point_is_clamped_at_zero():
    """Δ' = (-1, -2, -3): mean -2, so z0 = 0 and the losses see Δ alone:
    row 1: 1 - σ(0.5·2) = 0.2689414214; row 2: 1 - σ(0.5·4) = 1 - σ(2) = 0.1192029220;
    row 3 (λU = 1): 1 - σ(0.5·(0 - 0)) = 0.5."""
    ex = example()
    ex["policy_kl_logps"] = ex["ref_kl_logps"] - torch.tensor([1.0, 2.0, 3.0], dtype=F64)
    out = kto_loss(**ex, beta=0.5)
    assert out.kl.item() == 0.0
    close(out.losses, [0.2689414214, 0.1192029220, 0.5])


def test_kto_reference_point_carries_no_gradient():
    ex = example()
    policy = ex["policy_logps"].clone().requires_grad_(True)
    policy_kl = ex["policy_kl_logps"].clone().requires_grad_(True)
    ex.update(policy_logps=policy, policy_kl_logps=policy_kl)
    kto_loss(**ex, beta=0.5).losses.sum().backward()
    assert policy_kl.grad is None or torch.all(policy_kl.grad == 0)
    # d/dΔ of λ(1 - σ(β(Δ - z0))) = -λβσ(1 - σ): at row 1, σ = ½: -0.5·¼ = -0.125
    assert policy.grad[0].item() == pytest.approx(-0.125)
    assert policy.grad[2].item() > 0  # an undesirable row is pushed down


# ---- TRL's formula, re-derived from its KTOTrainer, on random inputs ------------------------


def trl_kto(policy, ref, policy_kl, ref_kl, labels, beta, desirable_weight, undesirable_weight):
    """TRL 1.16 `KTOTrainer._compute_loss` with precomputed reference log-probs, written the long
    way: the batch split by label with index_select, z0 the clamped mean of the KL log-ratios,
    the chosen then the rejected losses concatenated, weighted, and averaged with nanmean."""
    sig = lambda x: 1 / (1 + torch.exp(-x))  # noqa: E731
    chosen_idx = torch.nonzero(labels, as_tuple=False).view(-1)
    rejected_idx = torch.nonzero(~labels, as_tuple=False).view(-1)
    kl = (policy_kl - ref_kl).mean().detach().clamp(min=0)
    chosen_logratios = policy.index_select(0, chosen_idx) - ref.index_select(0, chosen_idx)
    rejected_logratios = policy.index_select(0, rejected_idx) - ref.index_select(0, rejected_idx)
    chosen_losses = 1 - sig(beta * (chosen_logratios - kl))
    rejected_losses = 1 - sig(beta * (kl - rejected_logratios))
    losses = torch.cat((desirable_weight * chosen_losses, undesirable_weight * rejected_losses), 0)
    return losses.nanmean(), kl, beta * chosen_logratios, beta * rejected_logratios


@pytest.mark.parametrize("beta, weights", [(0.1, (1.0, 1.0)), (0.5, (1.33, 0.7)), (2.0, (0.2, 3.0))])
def test_equals_trl_formula_on_random_inputs(beta, weights):
    gen = torch.Generator().manual_seed(int(beta * 100))
    n = 16
    policy, ref, policy_kl, ref_kl = (-torch.rand(n, generator=gen, dtype=F64) * 40 for _ in range(4))
    labels = torch.rand(n, generator=gen) < 0.4
    out = compute_loss(
        LossSettings(beta, loss_type="kto", desirable_weight=weights[0], undesirable_weight=weights[1]),
        PairLogps(policy, policy_kl, ref, ref_kl, labels=labels),
    )
    assert isinstance(out, KTOOutput)
    loss, kl, chosen_rewards, rejected_rewards = trl_kto(
        policy, ref, policy_kl, ref_kl, labels, beta, *weights
    )
    torch.testing.assert_close(out.losses.mean(), loss, rtol=0, atol=1e-12)
    torch.testing.assert_close(out.kl, kl, rtol=0, atol=1e-12)
    torch.testing.assert_close(out.chosen_rewards[labels], chosen_rewards, rtol=0, atol=1e-12)
    torch.testing.assert_close(out.chosen_rewards[~labels], rejected_rewards, rtol=0, atol=1e-12)


def test_policy_equal_to_reference_gives_half_per_row_weighted():
    """Δ = Δ' = 0 everywhere: z0 = 0 and every row's loss is λ·(1 - σ(0)) = λ/2."""
    logps, kl_logps = -torch.rand(6, dtype=F64) * 30, -torch.rand(6, dtype=F64) * 30
    labels = torch.tensor([True, False, True, True, False, False])
    out = kto_loss(logps, logps.clone(), kl_logps, kl_logps.clone(), labels, 0.1, 1.5, 0.5)
    close(out.losses, [0.75, 0.25, 0.75, 0.75, 0.25, 0.25])
    assert out.kl.item() == 0.0
    close(out.accuracy(0.1), [0.5] * 6)


def test_kto_settings_are_checked():
    assert LossSettings(0.1, loss_type="kto").unpaired
    problems = {
        "rpo_alpha": LossSettings(0.1, loss_type="kto", rpo_alpha=0.5).problem("train."),
        "mixed": LossSettings(0.1, loss_type="kto+sigmoid").problem("train."),
        "weight": LossSettings(0.1, loss_type="sigmoid", desirable_weight=2.0).problem("train."),
        "smoothing": LossSettings(0.1, loss_type="kto", label_smoothing=0.1).problem("train."),
    }
    assert problems["rpo_alpha"] == (
        "train.rpo_alpha=0.5 is a DPO option on pairs; train.loss_type=kto reads unpaired rows"
    )
    assert problems["mixed"] == "train.loss_type=kto+sigmoid: kto reads unpaired rows and stands alone"
    assert "has no effect with train.loss_type=sigmoid; it applies to kto" in problems["weight"]
    assert "label_smoothing=0.1 has no effect" in problems["smoothing"]
    with pytest.raises(ConfigError, match="train.undesirable_weight=-1.0"):
        load_config(None, ["train.loss_type=kto", "train.undesirable_weight=-1"])


def test_unbalanced_rows_get_trls_weight_advice():
    """100 desirable, 300 undesirable, λD = λU = 1: λD·nD/(λU·nU) = 1/3, outside [1, 4/3].
    λD in [300/100, 1.33·3] = [3.0, 3.99], or λU in [100/300/1.33, 100/300] = [0.25, 0.33]."""
    advice = weight_advice(100, 300, 1.0, 1.0)
    assert advice == (
        "100 desirable and 300 undesirable rows: with train.desirable_weight=1.0 and "
        "train.undesirable_weight=1.0, the KTO paper's balance (Eq. 8) suggests EITHER "
        "train.desirable_weight in [3.0, 3.99] OR train.undesirable_weight in [0.25, 0.33] (not both)"
    )
    assert weight_advice(100, 300, 3.5, 1.0) is None
    assert weight_advice(100, 300, 1.0, 0.3) is None
    assert weight_advice(200, 200, 1.0, 5.0) is None  # balanced: TRL says nothing


# ---- data: unpaired rows, pairs split into them, the KL completions ---------------------------


def data_config(tmp_path, rows, **overrides):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    config = load_config(None, [f"data.train_path={path}", "data.max_length=64", "data.max_prompt_length=32"])
    for key, value in overrides.items():
        setattr(config.data, key, value)
    return config.data, str(path)


UNPAIRED = [
    {"prompt": "Describe Ada in a few words.\n", "completion": "Ada is kind and warm.", "label": True},
    {"prompt": "Describe Alan in a few words.\n", "completion": "Alan is rude and cold.", "label": False},
    {"prompt": "Describe Grace in a few words.\n", "completion": "Grace is calm and fair.", "label": True},
]


def test_unpaired_rows_take_the_previous_rows_completion_as_kl(tmp_path, tiny_tokenizer):
    cfg, _ = data_config(tmp_path, UNPAIRED)
    rows, report = load_preference_data(cfg, tiny_tokenizer, "train", unpaired=True)
    assert report.format == "unpaired" and report.kept == 3 and not report.dropped
    assert [r.label for r in rows] == [True, False, True]
    assert all(isinstance(r, UnpairedRow) for r in rows)
    eos = tiny_tokenizer.eos_token_id
    for row, text in zip(rows, UNPAIRED):
        assert tiny_tokenizer.decode(row.completion_ids[:-1]).strip() == text["completion"]
        assert row.completion_ids[-1] == eos
    # rotated by one: row k's KL completion is row k-1's completion, row 0 takes the last one
    assert [r.kl_completion_ids for r in rows] == [
        rows[2].completion_ids,
        rows[0].completion_ids,
        rows[1].completion_ids,
    ]
    assert set(report.lengths) == {"prompt", "completion", "kl_completion", "pair"}
    # an unpaired row hashes apart from a pair of the same ids
    assert rows[0].pair_hash != load_pair_hash(rows[0])


def load_pair_hash(row):
    from lora_dpo.data import TokenizedPair

    return TokenizedPair(row.prompt_ids, row.chosen_ids, row.rejected_ids, row.source_index).pair_hash


def test_a_long_kl_completion_is_cut_and_never_cuts_its_row(tmp_path, tiny_tokenizer):
    """Each row is fitted alone; its KL completion takes what room is left after its prompt."""
    long = " and ".join(["kind", "warm", "calm", "fair", "brave", "gentle"] * 3)
    rows = [
        {"prompt": "Describe Ada.\n", "completion": f"Ada is {long}.", "label": True},
        {"prompt": "Describe Alan, please.\n", "completion": "Alan is rude.", "label": False},
    ]
    cfg, _ = data_config(tmp_path, rows, max_length=30, max_prompt_length=8)
    built, report = load_preference_data(cfg, tiny_tokenizer, "train", unpaired=True)
    first, second = built
    assert report.truncated == 1  # the first row's own completion is over 30 tokens
    assert len(first.prompt_ids) + len(first.completion_ids) == 30
    # the second row fits alone: its prompt is kept whole although it is over max_prompt_length
    assert len(second.prompt_ids) > 8
    assert len(second.prompt_ids) + len(second.kl_completion_ids) == 30
    assert second.kl_completion_ids == first.completion_ids[: 30 - len(second.prompt_ids)]
    assert first.kl_completion_ids == second.completion_ids


def test_pairs_are_split_as_trl_unpairs_them(tmp_path, tiny_tokenizer):
    """TRL's unpair_preference_dataset: per batch, every chosen completion, then every rejected one."""
    pairs = [
        {
            "prompt": f"Describe {name} in a few words.\n",
            "chosen": f"{name} is kind.",
            "rejected": f"{name} is rude.",
        }
        for name in ("Ada", "Alan", "Grace")
    ]
    cfg, _ = data_config(tmp_path, pairs)
    rows, report = load_preference_data(cfg, tiny_tokenizer, "train", unpaired=True)
    assert report.format == "explicit" and report.total == 3 and report.kept == 6
    assert [r.label for r in rows] == [True, True, True, False, False, False]
    assert [r.source_index for r in rows] == [0, 1, 2, 0, 1, 2]
    texts = [tiny_tokenizer.decode(r.completion_ids[:-1]).strip() for r in rows]
    assert texts == [
        "Ada is kind.",
        "Alan is kind.",
        "Grace is kind.",
        "Ada is rude.",
        "Alan is rude.",
        "Grace is rude.",
    ]
    # no row's KL completion comes from its own prompt here
    assert all(row.kl_completion_ids != row.completion_ids for row in rows)


def test_a_bad_label_is_dropped_with_its_line_or_stops_a_strict_run(tmp_path, tiny_tokenizer):
    rows = [*UNPAIRED[:1], {**UNPAIRED[1], "label": "yes"}, {**UNPAIRED[2], "label": None}, UNPAIRED[2]]
    cfg, path = data_config(tmp_path, rows)
    kept, report = load_preference_data(cfg, tiny_tokenizer, "train", unpaired=True)
    assert report.kept == 2 and report.dropped == {BAD_LABEL: 1, "missing_field": 1}
    assert report.example_lines[BAD_LABEL] == [2]
    assert report.first_problem() == "line 2 (row 1): field 'label' is a string 'yes', expected true or false"
    cfg.strict = True
    with pytest.raises(DataError) as error:
        load_preference_data(cfg, tiny_tokenizer, "train", unpaired=True)
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(
        f"{path}: line 2 (row 1): field 'label' is a string 'yes', expected true or false"
    )


def test_no_usable_row_names_the_first_bad_line(tmp_path, tiny_tokenizer):
    cfg, path = data_config(tmp_path, [{**UNPAIRED[0], "label": 1}])
    with pytest.raises(
        DataError, match=r"no usable unpaired row out of 1 rows \(bad_label: 1; first: line 1"
    ):
        load_preference_data(cfg, tiny_tokenizer, "train", unpaired=True)


def test_unpaired_rows_need_kto(tmp_path, tiny_tokenizer):
    cfg, path = data_config(tmp_path, UNPAIRED)
    with pytest.raises(DataError, match="the rows are unpaired .* train with train.loss_type=kto"):
        load_preference_data(cfg, tiny_tokenizer, "train")


def test_conversational_unpaired_rows_use_the_chat_template(tmp_path, tiny_tokenizer):
    tokenizer = type(tiny_tokenizer).from_pretrained(tiny_tokenizer.name_or_path)
    tokenizer.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{{ eos_token }}{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    rows = [
        {
            "prompt": [{"role": "user", "content": "Describe Ada."}],
            "completion": [{"role": "assistant", "content": "Ada is kind."}],
            "label": True,
        },
        {
            "prompt": [{"role": "user", "content": "Describe Alan."}],
            "completion": [{"role": "assistant", "content": "Alan is rude."}],
            "label": False,
        },
    ]
    cfg, _ = data_config(tmp_path, rows)
    built, report = build_unpaired_rows(rows, tokenizer, cfg, "chat")
    assert report.format == "unpaired_conversational" and report.kept == 2
    # the template closed each turn with EOS: exactly one at the end
    assert all(r.completion_ids.count(tokenizer.eos_token_id) == 1 for r in built)
    assert built[0].completion_ids[-1] == tokenizer.eos_token_id


# ---- the reference cache of unpaired rows ---------------------------------------------------

ROWS = 40  # demo pairs, so 80 unpaired rows


def kto_config(workdir, cache="cache-kto", **train):
    config = demo_config(workdir)
    config.data.max_pairs = ROWS
    config.precompute.cache_dir = str(workdir / cache)
    config.train.loss_type = "kto"
    config.train.generate_every = 0
    for key, value in train.items():
        setattr(config.train, key, value)
    config.validate()
    return config


@pytest.fixture(scope="module")
def kto_cache(demo_workdir):
    """The demo's pairs split into unpaired rows, their cache built by precompute-ref."""
    precompute_reference(kto_config(demo_workdir))
    return demo_workdir / "cache-kto"


def test_cache_holds_each_rows_completion_and_kl_completion(demo_workdir, kto_cache, tiny_tokenizer):
    """Round trip: the cached reference log-probs of each row's completion and KL completion are
    what the reference gives those sequences scored on their own, one row at a time."""
    from lora_dpo.batching import collate
    from lora_dpo.cache import policy_precision
    from lora_dpo.logps import sequence_logps
    from lora_dpo.model import load_base_at

    config = kto_config(demo_workdir)
    manifest = json.loads((kto_cache / "manifest.json").read_text())
    assert manifest["rows"] == "unpaired"
    assert manifest["kl_pairing"] == "previous_row_completion_over_the_split"
    assert manifest["pairs"] == {"train": 2 * ROWS, "eval": 2 * ROWS}  # max_pairs limits both splits
    assert Manifest.read(kto_cache).rows == "unpaired"
    assert (
        "rows",
        "unpaired (train.loss_type=kto): completion and KL completion, "
        "previous_row_completion_over_the_split",
    ) in manifest_rows(Manifest.read(kto_cache))

    rows, _ = load_preference_data(config.data, tiny_tokenizer, "train", unpaired=True)
    values = ReferenceCache(kto_cache).aligned(rows, "train")
    model = load_base_at(config.model, policy_precision(config, torch.device("cpu")), torch.device("cpu"))
    model.eval()
    for i in (0, 1, ROWS, 2 * ROWS - 1):
        row = rows[i]
        with torch.no_grad():
            out = sequence_logps(model, collate([row], 0))
        assert values.chosen_tokens[i] == len(row.completion_ids)
        assert values.rejected_tokens[i] == len(row.kl_completion_ids)
        torch.testing.assert_close(values.chosen_logps[i], out.chosen[0], rtol=0, atol=1e-4)
        torch.testing.assert_close(values.rejected_logps[i], out.rejected[0], rtol=0, atol=1e-4)
    # the KL completion of row i is the completion of row i-1: so are their token counts
    assert torch.equal(values.rejected_tokens, values.chosen_tokens.roll(1))


def test_a_cache_of_the_other_kind_of_rows_is_refused(demo_workdir, kto_cache, tmp_path):
    from lora_dpo.inputs import load_run_inputs

    dpo = demo_config(demo_workdir)
    dpo.data.max_pairs = ROWS
    dpo.precompute.cache_dir = str(kto_cache)
    with pytest.raises(CacheError) as error:
        precompute_reference(dpo)
    message = str(error.value)
    assert "\n" not in message
    assert message == (
        f"{kto_cache}: the reference cache holds unpaired rows and train.loss_type=sigmoid reads paired "
        "ones; build a cache for it with `lora-dpo precompute-ref` and this config into another "
        "precompute.cache_dir, or replace this one with `lora-dpo precompute-ref --rebuild`"
    )
    with pytest.raises(CacheError, match="holds unpaired rows and train.loss_type=sigmoid reads paired"):
        load_run_inputs(dpo)
    paired = tmp_path / "paired-cache"
    dpo.precompute.cache_dir = str(paired)
    precompute_reference(dpo)
    kto = kto_config(demo_workdir)
    kto.precompute.cache_dir = str(paired)
    with pytest.raises(CacheError, match="holds paired rows and train.loss_type=kto reads unpaired ones"):
        load_run_inputs(kto)
    with pytest.raises(CacheError, match="holds unpaired rows, .* paired ones"):
        merge_caches([kto_cache], paired)


def test_export_and_import_keep_the_rows_unpaired(kto_cache, tmp_path):
    table = tmp_path / "kto.parquet"
    export_cache(kto_cache, table)
    import_cache(table, tmp_path / "imported")
    imported = Manifest.read(tmp_path / "imported")
    assert imported.rows == "unpaired" and imported.total_pairs == Manifest.read(kto_cache).total_pairs


def test_a_manifest_says_what_its_rows_are(kto_cache, tmp_path):
    raw = json.loads((kto_cache / "manifest.json").read_text())
    assert (
        Manifest.from_dict({k: v for k, v in raw.items() if k not in ("rows", "kl_pairing")}, kto_cache).rows
        == "paired"
    )
    with pytest.raises(CacheError, match=r"field rows is 'triples', expected 'paired' or 'unpaired'"):
        Manifest.from_dict({**raw, "rows": "triples"}, kto_cache)
    with pytest.raises(CacheError, match="field kl_pairing is 'random'; this lora-dpo pairs rows as"):
        Manifest.from_dict({**raw, "kl_pairing": "random"}, kto_cache)


def test_every_layout_scores_a_row_and_its_kl_completion_alike(demo_workdir, tiny_tokenizer):
    """An unpaired row travels as a pair (its KL completion in the rejected slot, seeing the
    prompt alone), so the packed and prompt-shared layouts give the padded layout's KTO loss."""
    from lora_dpo.batching import COLLATE
    from lora_dpo.cache import policy_precision
    from lora_dpo.logps import sequence_logps
    from lora_dpo.model import load_base_at
    from lora_dpo.packing import choose_layout

    config = kto_config(demo_workdir)
    rows = load_preference_data(config.data, tiny_tokenizer, "train", unpaired=True)[0][30:50]
    cpu = torch.device("cpu")
    model = load_base_at(config.model, policy_precision(config, cpu), cpu)
    model.eval()
    ref = -torch.rand(len(rows), generator=torch.Generator().manual_seed(0)) * 20
    settings = LossSettings(0.1, loss_type="kto")
    losses = {}
    for layout in ("padded", "prompt_shared", "packed"):
        choose_layout(layout, model, cpu)
        with torch.no_grad():
            policy = sequence_logps(model, COLLATE[layout](rows, 0))
        labels = torch.tensor([row.label for row in rows])
        losses[layout] = compute_loss(settings, PairLogps.of(policy, ref - 1, ref - 2, labels=labels)).losses
    assert labels.any() and not labels.all()
    for layout in ("prompt_shared", "packed"):
        torch.testing.assert_close(losses[layout], losses["padded"], rtol=0, atol=1e-5)


# ---- KTO trains the demo task ---------------------------------------------------------------


def test_kto_trains_the_demo_task(demo_workdir, kto_cache, tmp_path):
    """The demo's pairs split into desirable and undesirable rows. At step 1 the policy is the
    reference: z0 = 0 and every row's loss is λ·(1 - σ(0)) = 0.5. Held out, `eval/kto/accuracy`
    (the share of rows whose reward sits on its label's side of β·z0) starts at ½ and rises."""
    config = kto_config(
        demo_workdir, output_dir=str(tmp_path / "run"), max_steps=16, logging_steps=1, epochs=2
    )
    result = train(config)
    before, after = result.eval_before, result.eval_after
    assert result.history[0]["loss"] == pytest.approx(0.5, abs=1e-5)
    assert before.loss == pytest.approx(0.5, abs=1e-5)
    assert before.kto["accuracy"] == pytest.approx(0.5, abs=1e-3)
    assert after.kto["accuracy"] >= 0.8, after.kto
    assert after.kto["rewards/desirable"] > after.kto["rewards/undesirable"]
    assert after.loss < before.loss
    records = [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    assert any("eval/kto/accuracy" in record for record in records)
