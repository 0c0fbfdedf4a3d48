"""Multiple-choice scoring against hand-computed log-likelihoods."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch

from flexiedge.cli import main
from flexiedge.zeroshot import Example, accuracy, choice_logprob, continuation_ids, read_task

# A context-free "unigram" model over characters: log p(token) is the same at every position, so the
# score of a choice is the sum of these numbers over " " + choice, by hand.
PROBS = {" ": 0.2, "a": 0.1, "b": 0.5, "c": 0.05}
REST = (1 - sum(PROBS.values())) / (128 - len(PROBS))


class CharTokenizer:
    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) for c in text]}


class Unigram(torch.nn.Module):
    def __init__(self):
        super().__init__()
        probs = torch.full((128,), REST, dtype=torch.float64)
        for ch, p in PROBS.items():
            probs[ord(ch)] = p
        self.register_buffer("logits", probs.log().float())

    def forward(self, input_ids, use_cache=False):
        return SimpleNamespace(logits=self.logits.expand(*input_ids.shape, 128))


def test_choice_score_is_the_hand_computed_log_likelihood():
    ctx, choice = continuation_ids(CharTokenizer(), "Q:", "bb")
    assert (ctx, choice) == ([ord("Q"), ord(":")], [ord(" "), ord("b"), ord("b")])
    expected = math.log(0.2) + 2 * math.log(0.5)
    assert choice_logprob(Unigram(), ctx, choice) == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("labels, acc", [
    ([1, 1, 1], 1.0),          # "bb" (-1.39 + log .2) beats "a" (-2.30) and "c" (-3.00): always predicted
    ([1, 0, 2], 1 / 3),
    ([0, 0, 2], 0.0),
])
def test_accuracy_and_standard_error(labels, acc):
    examples = [Example("Q:", ["a", "bb", "c"], label) for label in labels]
    result = accuracy(Unigram(), CharTokenizer(), examples, progress=False)
    assert (result.acc, result.n) == (pytest.approx(acc), 3)
    assert result.stderr == pytest.approx(math.sqrt(acc * (1 - acc) / 2))  # lm-eval's sample stderr


def test_real_model_score_matches_masked_cross_entropy(tiny_model, tiny_tokenizer):
    """Same number through an independent path: HF's own loss with the context masked out."""
    model = tiny_model()
    ctx, choice = continuation_ids(tiny_tokenizer, "Alice was beginning", "to get very tired")
    ids = torch.tensor([ctx + choice])
    labels = ids.clone()
    labels[0, :len(ctx)] = -100
    with torch.no_grad():
        mean_nll = float(model(input_ids=ids, labels=labels).loss)
    assert choice_logprob(model, ctx, choice) == pytest.approx(-mean_nll * len(choice), rel=1e-5)


def test_bigbench_and_jsonl_task_files(tmp_path):
    bb = tmp_path / "winowhy" / "task.json"
    bb.parent.mkdir()
    bb.write_text(json.dumps({"example_input_prefix": "Q: ", "examples": [
        {"input": "x", "target_scores": {"correct": 0, "incorrect": 1}}]}))
    assert read_task(bb) == [Example("Q: x", ["correct", "incorrect"], 1)]
    jl = tmp_path / "t.jsonl"
    jl.write_text('{"context": "c", "choices": ["p", "q"], "label": 0}\n' * 5)
    assert len(read_task(jl, limit=2)) == 2


def test_cli_eval_tasks(tiny_run, tmp_path, capsys):
    task = tmp_path / "t.jsonl"
    task.write_text('{"context": "Alice was", "choices": ["tired", "sitting by"], "label": 0}\n' * 3)
    assert main(["eval", str(tiny_run()), "--tasks", str(task), "--json"]) == 0
    (result,) = json.loads(capsys.readouterr().out)["tasks"]
    assert result["n"] == 3 and result["task"] == "t"
