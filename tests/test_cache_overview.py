"""`cache info` says, and `cache info --plot` draws, what the reference makes of the pairs before
training: its per-token margin and how often the chosen response is the longer one."""

from __future__ import annotations

import shutil

import pytest

from lora_dpo.cache import PairOverview, ReferenceCache, build_cache
from lora_dpo.cli import main as cli_main
from lora_dpo.data import load_preference_data
from lora_dpo.demo import demo_config
from lora_dpo.model import load_tokenizer

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def cached(demo_workdir, tmp_path_factory):
    root = tmp_path_factory.mktemp("overview")
    for part in ("model", "data"):
        shutil.copytree(demo_workdir / part, root / part)
    config = demo_config(root)
    config.data.eval_path = None
    config.precompute.cache_dir = str(root / "cache")
    build_cache(config)
    return config


def test_info_states_margins_and_lengths_and_plot_draws_them(cached, tmp_path, capsys):
    cache_dir = cached.precompute.cache_dir
    pairs = load_preference_data(cached.data, load_tokenizer(cached.model), "train")[0]
    # From the data and the stored values, without the overview's code:
    chosen_longer = sum(len(p.chosen_ids) > len(p.rejected_ids) for p in pairs) / len(pairs)
    same = sum(len(p.chosen_ids) == len(p.rejected_ids) for p in pairs) / len(pairs)
    cache = ReferenceCache(cache_dir)
    margins = [
        c / nc - r / nr
        for c, nc, r, nr in zip(
            cache.chosen_logps.tolist(),
            cache.chosen_tokens.tolist(),
            cache.rejected_logps.tolist(),
            cache.rejected_tokens.tolist(),
        )
    ]
    prefers = sum(m > 0 for m in margins) / len(margins)
    assert 0 < chosen_longer < 1 and 0 < prefers < 1  # the demo task has both kinds

    assert cli_main(["cache", "info", cache_dir, "--plot"]) == 0
    out = capsys.readouterr().out
    assert f"mean {sum(margins) / len(margins):+.3f}" in out
    assert f"the reference prefers chosen in {prefers:.1%} of {len(pairs)} pairs" in out
    assert f"chosen longer in {chosen_longer:.1%} of pairs, same length {same:.1%}" in out
    plot = cache.cache_dir / "cache.png"
    assert f"plot: {plot}" in out
    assert plot.read_bytes()[:8] == PNG

    elsewhere = tmp_path / "look" / "margins.png"
    assert cli_main(["cache", "info", cache_dir, "--plot", str(elsewhere)]) == 0
    assert elsewhere.read_bytes()[:8] == PNG
    assert f"plot: {elsewhere}" in capsys.readouterr().out
    assert cli_main(["cache", "info", cache_dir]) == 0
    assert "plot:" not in capsys.readouterr().out

    overview = PairOverview.of(cache)
    assert overview.chosen_longer == pytest.approx(
        chosen_longer
    ) and overview.prefers_chosen == pytest.approx(prefers)
