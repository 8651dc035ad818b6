"""What the processes of one run agree on at every optimizer step.

Every process takes part in the same collectives in the same order, or one of them waits
forever. So nothing stops a process on its own: a non-finite loss, a signal or an exception
on one rank is only *recorded*, then one small status tensor is all-reduced at every step and
every rank decides the same thing from it at the same step.

The weight check compares a fingerprint of the adapters (two integers), computed one
parameter at a time from the raw bits, so it costs no copy of the weights and catches a
difference in any single bit.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

# For tests only: "RANK:STEP" (or "RANK:STEP:error") makes that rank's loss NaN (or raise)
# at that optimizer step, to show that every process stops together.
POISON_ENV = "QRLORA_TEST_POISON"

NONFINITE, SIGNAL, FAILED, LOSS = range(4)  # slots of one rank's status row
_ROW = 4


@dataclass
class RankStatus:
    """What this process saw during one optimizer step."""

    nonfinite_loss: float | None = None  # the loss value when it was NaN/Inf
    signal: int | None = None
    error: BaseException | None = None
    where: str = ""  # which batch, for the message


@dataclass
class StepVerdict:
    """What every process saw, identical on every rank after ``agree``."""

    nonfinite: dict[int, float] = field(default_factory=dict)  # rank -> loss
    signals: dict[int, int] = field(default_factory=dict)  # rank -> signal number
    failed: list[int] = field(default_factory=list)  # ranks that raised

    @property
    def stop_now(self) -> bool:
        """Stop before this step's update: its gradients cannot be trusted."""
        return bool(self.nonfinite or self.failed)

    @property
    def signal(self) -> int | None:
        return min(self.signals.values()) if self.signals else None


def agree(status: RankStatus, rank: int, world: int, device) -> StepVerdict:
    """All-reduce one (world × 4) tensor: each rank fills its own row."""
    # on the device of the collective backend (NCCL needs CUDA); alone, on the CPU
    table = torch.zeros(world, _ROW, dtype=torch.float64, device=device if world > 1 else "cpu")
    row = table[rank]
    if status.nonfinite_loss is not None:
        row[NONFINITE] = 1
        # NaN would poison the sum of the other rows' zeros only in this slot; store a code
        v = status.nonfinite_loss
        row[LOSS] = 0 if v != v else (1 if v > 0 else -1)
    if status.signal is not None:
        row[SIGNAL] = status.signal
    if status.error is not None:
        row[FAILED] = 1
    if world > 1:
        torch.distributed.all_reduce(table)
    verdict = StepVerdict()
    for r, (nonfinite, sig, failed, code) in enumerate(table.cpu().tolist()):
        if nonfinite:
            verdict.nonfinite[r] = float("nan") if code == 0 else float("inf") * code
        if sig:
            verdict.signals[r] = int(sig)
        if failed:
            verdict.failed.append(r)
    return verdict


def all_reduce_gradients(params: list[torch.nn.Parameter], world: int) -> None:
    """Mean of every adapter gradient across processes (one flat all-reduce)."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    torch.distributed.all_reduce(flat)
    flat /= world
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset : offset + n].view_as(p).clone()
        offset += n


_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def fingerprint(params: list[torch.Tensor]) -> torch.Tensor:
    """Two int64 numbers that change when any bit of any parameter changes.

    Each parameter's bits are read as integers and summed plain and position-weighted;
    int64 sums wrap, and wrapping addition is associative, so the result does not depend on
    the summation order of the device. Only one parameter's temporaries exist at a time."""
    acc = None
    for i, p in enumerate(params):
        bits = p.detach().reshape(-1).view(_INT_OF_SIZE[p.element_size()]).to(torch.int64)
        position = torch.arange(1, bits.numel() + 1, dtype=torch.int64, device=bits.device)
        part = torch.stack([bits.sum(), (bits * position).sum()]) * (2 * i + 1)
        acc = part if acc is None else acc + part
    return acc if acc is not None else torch.zeros(2, dtype=torch.int64)


def ranks_out_of_sync(params: list[torch.Tensor], world: int) -> list[int]:
    """The ranks whose adapter weights differ from rank 0's (empty when all agree)."""
    mine = fingerprint(params)
    gathered = [torch.zeros_like(mine) for _ in range(world)]
    torch.distributed.all_gather(gathered, mine)
    return [r for r, g in enumerate(gathered) if not torch.equal(g, gathered[0])]


def poison_for(rank: int, step: int) -> str | None:
    """The test hook: "nan" or "error" when ``POISON_ENV`` names this rank and step."""
    spec = os.environ.get(POISON_ENV)
    if not spec:
        return None
    parts = spec.split(":")
    if int(parts[0]) == rank and int(parts[1]) == step:
        return parts[2] if len(parts) > 2 else "nan"
    return None
