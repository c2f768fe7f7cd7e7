"""The main job: `lora-dpo demo` learns its held-out task from chance to (near) perfect, and
what the policy writes shows it: kind descriptions of names it never trained on."""

from __future__ import annotations

import json

from lora_dpo.demo import run_demo
from lora_dpo.demo.run import SAMPLES_PER_NAME
from lora_dpo.demo.task import HELD_OUT_NAMES, KIND, NAMES, UNKIND
from lora_dpo.samples import read_samples


def test_demo_learns_the_held_out_task(tmp_path, capsys):
    demo = run_demo(tmp_path / "demo")
    result = demo.train
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

    # What they write: the taught reference picks kind and unkind words alike, the policy kind ones.
    samples = demo.samples
    assert len(samples) == HELD_OUT_NAMES * SAMPLES_PER_NAME
    assert {s.prompt.split()[1] for s in samples} == set(NAMES[-HELD_OUT_NAMES:])  # unseen names
    assert demo.reference_kind_share == kind_share([s.reference for s in samples])
    assert demo.policy_kind_share == kind_share([s.policy for s in samples])
    assert 0.25 <= demo.reference_kind_share <= 0.75
    assert demo.policy_kind_share >= 0.9
    # the reference writes the task's format, with kind and unkind words alike
    assert kind_share([s.reference for s in samples], UNKIND) >= 0.25
    line = f"only kind words      {demo.reference_kind_share:.2f} (reference) -> {demo.policy_kind_share:.2f} (policy)"
    assert line in printed
    for example in samples[::SAMPLES_PER_NAME][:3]:  # the first sample of three names
        assert f"reference: {example.reference!r}\n    policy:    {example.policy!r}" in printed

    # train.generate_every: greedy samples at steps 8, 16, 24, and the report's Samples section
    run = result.output_dir
    greedy = read_samples(run / "samples.jsonl")
    assert sorted({s.step for s in greedy}) == [8, 16, 24]
    final = [s for s in greedy if s.step == 24]
    assert kind_share([s.policy for s in final]) == 1.0  # after DPO: kind words only
    report = (run / "report.md").read_text()
    section = report[report.index("## Samples") :]
    assert all(s.policy in section and s.reference in section for s in final)
    assert "| generated length | ok |" in report and "| repetition | ok |" in report


def kind_share(texts: list[str], words: list[str] = KIND) -> float:
    """Share of texts that read "<name> is <a> and <b>." with a and b both among `words`."""

    def described(text: str) -> bool:
        text = text.strip()
        parts = text.removesuffix(".").split(" ")
        return (
            text.endswith(".")
            and len(parts) >= 5
            and parts[-4] == "is"
            and parts[-2] == "and"
            and {parts[-3], parts[-1]} <= set(words)
        )

    return sum(map(described, texts)) / len(texts)
