"""Win rate against the reference, judged by a local reward model whose scores are known exactly."""

from __future__ import annotations

import math

import pytest
import torch

from lora_dpo.demo.models import build_last_token_reward_model
from lora_dpo.errors import ConfigError
from lora_dpo.generate import Completion
from lora_dpo.judge import judge_texts, load_reward_model, score_texts, win_rate

CPU = torch.device("cpu")
EPS = 1e-6  # LlamaConfig's rms_norm_eps: the known score is token_scores[last] / sqrt(1 + EPS)


def last_id(tokenizer, text: str) -> int:
    return tokenizer(text)["input_ids"][-1]


@pytest.fixture(scope="module")
def word_judge(tiny_tokenizer, tmp_path_factory):
    """Scores a text by its last word: ' kind' 2, ' warm' 1, ' rude' -1, anything else 0."""
    scores = torch.zeros(len(tiny_tokenizer))
    words = {" kind": 2.0, " warm": 1.0, " rude": -1.0}
    ids = {word: last_id(tiny_tokenizer, "Ada is" + word) for word in words}
    assert len(set(ids.values())) == 3 and all(
        len(tiny_tokenizer(w, add_special_tokens=False)["input_ids"]) == 1 for w in words
    )
    for word, score in words.items():
        scores[ids[word]] = score
    path = build_last_token_reward_model(tmp_path_factory.mktemp("rm"), tiny_tokenizer, scores)
    return load_reward_model(str(path), CPU)


def test_win_rate_has_its_exact_expected_value(word_judge):
    prompts = [f"Describe {name} in a few words.\n" for name in ("Ada", "Alan", "Grace", "Ken", "Rob")]
    reference = ["Ada is rude", "Alan is kind", "Grace is warm", "Ken is so", "Rob is rude"]
    policy = ["Ada is kind", "Alan is warm", "Grace is warm", "Ken is kind", "Rob is so"]
    # by hand: win (2 > -1), loss (1 < 2), tie (1 = 1), win (2 > 0), win (0 > -1)
    expected_rate, expected_gain = (1 + 0 + 0.5 + 1 + 1) / 5, (3 - 1 + 0 + 2 + 1) / 5

    def judged(texts: list[str]) -> list[str]:
        return judge_texts(prompts, [Completion((), text, True) for text in texts])

    ref_scores = score_texts(word_judge, judged(reference), batch_size=2)  # padded batches
    pol_scores = score_texts(word_judge, judged(policy), batch_size=2)
    assert ref_scores.tolist() == pytest.approx([s / math.sqrt(1 + EPS) for s in (-1, 2, 1, 0, -1)], abs=1e-6)
    result = win_rate(ref_scores, pol_scores)
    assert result.win_rate == expected_rate == 0.7
    assert result.score_gain == pytest.approx(expected_gain / math.sqrt(1 + EPS), abs=1e-6)
    assert result.prompts == 5
    # a text scores the same alone as in any padded batch
    alone = torch.cat([score_texts(word_judge, [text], batch_size=1) for text in judged(policy)])
    assert torch.equal(alone, pol_scores)


def test_a_policy_equal_to_its_reference_wins_half():
    scores = torch.tensor([0.3, -2.0, 5.0])
    assert win_rate(scores, scores.clone()).win_rate == 0.5
    assert win_rate(scores, scores.clone()).score_gain == 0.0


def test_a_bad_reward_model_is_a_one_line_error(tmp_path):
    with pytest.raises(ConfigError, match=r"^train.reward_model='.*missing': no such directory"):
        load_reward_model(str(tmp_path / "missing"), CPU)
    with pytest.raises(
        ConfigError, match=r"^train.reward_model='.*': cannot load it as a sequence-classification model"
    ):
        load_reward_model(str(tmp_path), CPU)  # a directory without a model


def test_a_classifier_with_several_labels_is_refused(tiny_tokenizer, tmp_path):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    config = LlamaConfig(
        vocab_size=len(tiny_tokenizer),
        hidden_size=16,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        num_labels=3,
        pad_token_id=tiny_tokenizer.pad_token_id,
    )
    LlamaForSequenceClassification(config).save_pretrained(str(tmp_path))
    tiny_tokenizer.save_pretrained(str(tmp_path))
    with pytest.raises(
        ConfigError, match=r"the model has 3 labels; a reward model gives one score \(num_labels=1\)"
    ):
        load_reward_model(str(tmp_path), CPU)
