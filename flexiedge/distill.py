"""Distillation from the unpruned model: KL(teacher || student) on next-token distributions, teacher cached.

The teacher (the source model the run was pruned from) is run once per training batch; its top-k log-probs
and their token ids are kept on disk, keyed by the batch's token ids, so every later epoch, resumed run or
other recipe on the same data order reuses them. The KL is exact on the top-k tokens plus one "rest" bucket
for the remaining mass:

    KL = sum_{i in K} p_i (log p_i - log q_i) + p_R (log p_R - log q_R),   p_R = 1 - sum_{i in K} p_i

which is the full KL when k = vocabulary size (p_R = 0), and otherwise the KL of the two distributions
coarsened to K + {rest}.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
import torch.nn.functional as F

from .cache import atomic_file


def topk_kl(student_logits: torch.Tensor, teacher_logp: torch.Tensor, teacher_ids: torch.Tensor) -> torch.Tensor:
    """Mean over positions of KL(teacher || student) on the teacher's top-k tokens plus the rest bucket.

    student_logits (..., V); teacher_logp, teacher_ids (..., k): the teacher's top-k log-probs and token ids.
    """
    logq_all = F.log_softmax(student_logits.float(), dim=-1)
    logq = logq_all.gather(-1, teacher_ids.long())
    logp = teacher_logp.float()
    p = logp.exp()
    kl = (p * (logp - logq)).sum(-1)
    p_rest = (1 - p.sum(-1)).clamp_min(0)
    logq_rest = torch.log1p(-torch.logsumexp(logq, dim=-1).exp().clamp(max=1 - 1e-7))
    rest = torch.where(p_rest > 1e-9, p_rest * (torch.log(p_rest.clamp_min(1e-30)) - logq_rest),
                       torch.zeros_like(p_rest))
    return (kl + rest).mean()


def full_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Reference: mean over positions of the exact KL(teacher || student)."""
    logp = F.log_softmax(teacher_logits.float(), -1)
    logq = F.log_softmax(student_logits.float(), -1)
    return (logp.exp() * (logp - logq)).sum(-1).mean()


class Teacher:
    """The unpruned model's top-k next-token log-probs for a batch, computed once and cached on disk."""

    def __init__(self, model, k: int, cache: Path, identity: str):
        self.model, self.k, self.cache = model, k, Path(cache)
        self.identity = identity          # names the teacher's weights: part of every cache key
        self.computed = self.reused = 0
        self.cache.mkdir(parents=True, exist_ok=True)

    def key(self, batch: torch.Tensor) -> str:
        h = hashlib.sha256(f"{self.identity}|k={self.k}|{tuple(batch.shape)}".encode())
        h.update(batch.cpu().to(torch.int64).numpy().tobytes())
        return h.hexdigest()[:32]

    @torch.no_grad()
    def topk(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        path = self.cache / f"{self.key(batch)}.pt"
        if path.is_file():
            self.reused += 1
            logp, ids = torch.load(path)
        else:
            self.computed += 1
            logits = self.model(input_ids=batch.to(next(self.model.parameters()).device), use_cache=False).logits
            logp, ids = F.log_softmax(logits.float(), -1).topk(self.k, dim=-1)
            logp, ids = logp.cpu(), ids.to(torch.int32).cpu()
            with atomic_file(path) as tmp:
                torch.save((logp, ids), tmp)
        return logp.to(batch.device), ids.to(batch.device)
