"""Zero-shot multiple-choice accuracy by log-likelihood, scored the way lm-eval-harness scores `acc`.

For each example, every choice c is scored as  sum_t log p(c_t | context, c_<t)  (the choice's tokens only,
after the context); the prediction is the argmax; accuracy is reported with its standard error
sqrt(acc (1 - acc) / (n - 1)) and the example count, as lm-eval does.

Tasks are BIG-bench style JSON files ({"examples": [{"input": ..., "target_scores": {choice: 0/1}}]}) or
JSONL files with one {"context" (or "input"), "choices", "label"} object per line:

    flexiedge eval runs/smollm2-30-rec --tasks path/to/social_iqa/task.json --limit 500

(lm-eval 0.4.13 does install beside transformers 5, but its tasks download datasets from the HF hub;
this scorer needs no network.)
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .errors import FlexiEdgeError


@dataclass
class Example:
    context: str
    choices: list[str]
    label: int


@dataclass
class Accuracy:
    task: str
    acc: float
    stderr: float
    n: int

    def as_dict(self) -> dict:
        return dict(task=self.task, acc=self.acc, stderr=self.stderr, n=self.n)


def read_task(path: str | Path, limit: int | None = None) -> list[Example]:
    """Examples from a BIG-bench task.json or a JSONL file; the first `limit` only, if given."""
    path = Path(path)
    if not path.is_file():
        raise FlexiEdgeError(f"task file {path} not found: give a BIG-bench task.json or a .jsonl of "
                             "{context, choices, label}")
    if path.suffix == ".jsonl":
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        examples = [Example(r.get("context", r.get("input", "")), list(r["choices"]), int(r["label"])) for r in rows]
    else:
        task = json.loads(path.read_text())
        prefix = task.get("example_input_prefix", "")
        examples = []
        for ex in task["examples"]:
            scores = ex["target_scores"]
            choices = list(scores)
            examples.append(Example(prefix + ex["input"], choices, max(range(len(choices)), key=lambda i: scores[choices[i]])))
    return examples[:limit] if limit else examples


def continuation_ids(tokenizer, context: str, choice: str) -> tuple[list[int], list[int]]:
    """Context and choice tokens, with a space between them (lm-eval's target_delimiter)."""
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
    full = tokenizer(context + " " + choice, add_special_tokens=False)["input_ids"]
    # Tokenise the whole string and split where the context ends, so merges across the boundary stay right.
    common = next((i for i, (a, b) in enumerate(zip(ctx, full)) if a != b), min(len(ctx), len(full)))
    common = min(common, len(full) - 1)
    return full[:common], full[common:]


@torch.no_grad()
def choice_logprob(model, context_ids: list[int], choice_ids: list[int]) -> float:
    """sum_t log p(choice_t | context, choice_<t)."""
    ids = torch.tensor([context_ids + choice_ids])
    logprobs = F.log_softmax(model(input_ids=ids, use_cache=False).logits[0].float(), dim=-1)
    start = len(context_ids)
    targets = ids[0, start:]
    return float(logprobs[start - 1:-1].gather(1, targets[:, None]).sum())


def accuracy(model, tokenizer, examples: list[Example], task: str = "task", progress: bool = True) -> Accuracy:
    model.eval()
    correct = 0
    for ex in tqdm(examples, desc=task, unit="ex", disable=not progress):
        scores = [choice_logprob(model, *continuation_ids(tokenizer, ex.context, c)) for c in ex.choices]
        correct += int(max(range(len(scores)), key=scores.__getitem__) == ex.label)
    n = len(examples)
    acc = correct / n
    return Accuracy(task, acc, math.sqrt(acc * (1 - acc) / (n - 1)) if n > 1 else float("nan"), n)


def eval_tasks(model, tokenizer, tasks: list[str], limit: int | None = None) -> list[Accuracy]:
    return [accuracy(model, tokenizer, read_task(t, limit), task=Path(t).parent.name if Path(t).name == "task.json"
                     else Path(t).stem) for t in tasks]
