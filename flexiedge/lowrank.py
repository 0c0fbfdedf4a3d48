"""Low-rank linear algebra of the method: truncated SVD, the base-selection distance, adapter factors.

METHOD.md section 2 (distance) and section 3 (SVD initialisation of the per-slot LoRA).
"""

from __future__ import annotations

import torch

# Above this many columns/rows a randomized SVD gives the same leading factors much faster.
EXACT_SVD_MAX_DIM = 2048


def truncated_svd(w: torch.Tensor, rank: int, method: str = "auto", seed: int = 0):
    """Leading `rank` singular triplets of `w`: (U (m,r), S (r,), V (n,r)), in fp32."""
    m, n = w.shape
    if rank > min(m, n):
        raise ValueError(f"rank {rank} is larger than the matrix ({m} x {n}) allows (at most {min(m, n)})")
    w = w.float()
    if method == "auto":
        method = "exact" if min(m, n) <= EXACT_SVD_MAX_DIM else "randomized"
    if method == "exact":
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        return u[:, :rank], s[:rank], vh[:rank].T
    if method == "randomized":
        gen_state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        u, s, v = torch.svd_lowrank(w, q=min(rank + 16, min(m, n)), niter=6)
        torch.random.set_rng_state(gen_state)
        return u[:, :rank], s[:rank], v[:, :rank]
    raise ValueError(f"unknown SVD method {method!r}: use exact, randomized or auto")


def low_rank_factors(w: torch.Tensor, rank: int, method: str = "auto"):
    """What = L @ R.T, the best rank-r approximation of w, as factors L = U S (m,r) and R = V (n,r)."""
    u, s, v = truncated_svd(w, rank, method)
    return u * s, v


def low_rank_distance(factors_i, factors_j, rank: int) -> float:
    """|| What_i - (What_j + Delta_ij) ||_F where Delta_ij is the rank-r truncation of What_i - What_j.

    What_i - What_j = [L_i, -L_j] [R_i, R_j]^T has rank <= 2r, so the distance is the norm of its
    singular values r+1..2r: the part of the difference a rank-r adapter cannot absorb. Two thin QRs
    reduce the SVD to a 2r x 2r matrix.
    """
    (li, ri), (lj, rj) = factors_i, factors_j
    _, rl = torch.linalg.qr(torch.cat([li, -lj], dim=1))
    _, rr = torch.linalg.qr(torch.cat([ri, rj], dim=1))
    s = torch.linalg.svdvals(rl @ rr.T)
    return float(s[rank:].pow(2).sum().sqrt())


def adapter_init(w_pruned: torch.Tensor, w_base: torch.Tensor, rank: int, method: str = "auto"):
    """LoRA factors from the truncated SVD of W_pruned - W_base (METHOD.md section 3).

    Returns (lora_A (r, d_in), lora_B (d_out, r)) with lora_B @ lora_A the best rank-r approximation
    of the difference; all of S goes into the output-side factor lora_B.
    """
    u, s, v = truncated_svd(w_pruned.float() - w_base.float(), rank, method)
    # Fresh row-major copies: at rank 1, LAPACK's column-major U gives a (d, 1) tensor with stride (1, d) that
    # counts as contiguous yet cannot be viewed as raw bytes by a tensor writer.
    return (v.T.clone(memory_format=torch.contiguous_format), (u * s).clone(memory_format=torch.contiguous_format))
