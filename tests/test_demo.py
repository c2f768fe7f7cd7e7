"""The main job: `lora-dpo demo` learns its held-out task from chance to (near) perfect."""

from __future__ import annotations

import json

from lora_dpo.demo import run_demo


def test_demo_learns_the_held_out_task(tmp_path, capsys):
    result = run_demo(tmp_path / "demo")
    before, after = result.eval_before, result.eval_after
    # Before training the policy is the reference: margins are ~0, accuracy is chance.
    assert 0.3 <= before.reward_accuracy <= 0.7
    assert abs(before.reward_margin) < 1e-4
    assert after.reward_accuracy >= 0.9
    assert after.reward_margin > 0.1
    printed = capsys.readouterr().out
    assert "reward accuracy" in printed and str(result.adapter_dir) in printed
    manifest = json.loads((tmp_path / "demo" / "ref-cache" / "manifest.json").read_text())
    assert manifest["pairs"] == {"train": 256, "eval": 64}
