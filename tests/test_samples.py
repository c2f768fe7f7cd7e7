"""samples.jsonl round trip, the Samples markdown, and the report's two generation checks."""

from __future__ import annotations

from lora_dpo.report import check_generated_length, check_repetition
from lora_dpo.samples import (
    Sample,
    latest,
    read_samples,
    repeated_ngram_share,
    samples_markdown,
    write_samples,
)


def sample(
    step: int | None = 10,
    index: int = 0,
    *,
    reference: str = "Ada is kind.",
    policy: str = "Ada is warm.",
    reference_tokens: int = 8,
    policy_tokens: int = 8,
    policy_finished: bool = True,
) -> Sample:
    return Sample(
        step,
        index,
        "Describe Ada.\n",
        reference,
        policy,
        reference_tokens,
        policy_tokens,
        True,
        policy_finished,
    )


def test_samples_round_trip_and_markdown(tmp_path):
    samples = [
        sample(0, 0),
        sample(0, 1, policy="a|b"),
        sample(10, 0, policy="cut off", policy_finished=False),
    ]
    jsonl, markdown = write_samples(tmp_path, samples)
    assert read_samples(jsonl) == samples
    text = markdown.read_text()
    assert text.index("Step 0:") < text.index("Step 10:")
    assert "| Describe Ada.⏎ | Ada is kind. | a\\|b |" in text  # one line per cell, | escaped
    assert "| cut off [cut] |" in text
    assert latest(samples) == samples[2:]
    assert latest([sample(None, 0), sample(None, 1)]) == [sample(None, 0), sample(None, 1)]
    assert "\n".join(samples_markdown(samples, limit=1)).count("| Describe Ada.⏎") == 2  # one per step


def test_a_damaged_samples_line_is_skipped(tmp_path):
    jsonl, _ = write_samples(tmp_path, [sample(1, 0), sample(1, 1)])
    lines = jsonl.read_text().splitlines()
    jsonl.write_text(lines[0] + "\n{not json\n" + '{"step": 1}\n' + lines[1] + "\n")
    assert read_samples(jsonl) == [sample(1, 0), sample(1, 1)]


def test_repeated_ngram_share_counts_repeats_within_each_text():
    assert repeated_ngram_share(["a b c d a b c d"], 4) == 1 / 5  # 5 grams, "a b c d" twice
    assert repeated_ngram_share(["a b c d e", "a b c d e"], 4) == 0.0  # repeats across texts don't count
    assert repeated_ngram_share(["a a a a a a"], 4) == 2 / 3
    assert repeated_ngram_share(["too short", ""], 4) == 0.0


def test_length_check_fires_outside_half_to_double():
    assert check_generated_length([]).detail.startswith("not judged")
    means = [
        sample(policy_tokens=9, reference_tokens=10),
        sample(index=1, policy_tokens=31, reference_tokens=10),
    ]
    assert check_generated_length(means).warning is None  # mean 20 vs 10: the ratio of means, 2
    for policy_tokens in (5, 20):  # exactly 0.5 and 2: inside
        assert (
            check_generated_length([sample(policy_tokens=policy_tokens, reference_tokens=10)]).warning is None
        )
    long = check_generated_length([sample(policy_tokens=21, reference_tokens=10)])
    short = check_generated_length([sample(policy_tokens=4, reference_tokens=10)])
    assert long.warning and "(ratio 2.10, outside [0.5, 2])" in long.warning
    assert short.warning and "(ratio 0.40, outside [0.5, 2])" in short.warning
    assert (
        long.detail
        == "mean 21.0 tokens (policy) vs 10.0 (reference), ratio 2.10, 1 held-out prompts at step 10"
    )


def test_repetition_check_fires_above_three_in_ten_repeated_4grams():
    assert check_repetition([]).detail.startswith("not judged")
    unique = "b c d e f g h i j"  # 9 words, 6 distinct 4-grams
    at_limit = [sample(policy="a a a a a a a"), sample(index=1, policy=unique)]  # 3 of 10 repeat
    assert repeated_ngram_share([s.policy for s in at_limit]) == 0.3
    assert check_repetition(at_limit).warning is None
    above = [sample(policy="a a a a a a a a"), sample(index=1, policy=unique[:-2])]  # 4 of 10 repeat
    fired = check_repetition(above)
    assert fired.warning and fired.warning.startswith(
        "degenerate repetition: at step 10 40% of the policy's word 4-grams"
    )
    assert fired.detail == "repeated word 4-grams 40.0% (policy) vs 0.0% (reference) at step 10"
