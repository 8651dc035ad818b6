"""An independent implementation of the official QR-LoRA maths, for tests only.

Written from the algorithm of the official code (luna-ai-lab/QR-LoRA, its training script):
full SVD, the rank-r core scaled by 1/s, a full reduced QR of the core (not of its first r
columns), Q = first r columns, R = first r rows, and no sign normalisation.
"""

import torch


def official_qr(weight: torch.Tensor, rank: int, scale: float = 1.0):
    w = weight if weight.dtype == torch.float64 else weight.to(torch.float32)  # official: fp32
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    core = u[:, :rank] @ torch.diag(s[:rank] / scale) @ vh[:rank, :]
    q, r = torch.linalg.qr(core, mode="reduced")
    return q[:, :rank].contiguous(), r[:rank, :].contiguous()


def official_delta_weight(q, delta_r, scale=1.0, triu=True):
    if triu:
        delta_r = delta_r * torch.triu(torch.ones_like(delta_r))
    return scale * q @ delta_r
