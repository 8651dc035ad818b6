"""The trainable adapters: QR-LoRA (frozen Q, trained ΔR) and a standard LoRA baseline.

Adapters patch the ``forward`` of the targeted ``nn.Linear`` modules in place (the base
module, its name and its weight stay untouched, so gradient checkpointing, state dicts and
``W`` itself are unaffected): ``y = base(x) + m·s·((drop(x)·Aᵀ)·Bᵀ)`` where for QR-LoRA
A = ΔR⊙M (trained, zero at init) and B = Q (a buffer), and for LoRA A = down, B = up (both
trained, up zero at init). W is never modified: that is mathematically the official
"W − QR + Q(R + ΔR)" and cheaper.
"""

from __future__ import annotations

import math
from typing import Mapping

import torch
from torch import nn

from qrlora.errors import UserError
from qrlora.qr import apply_mask


class _Adapter(nn.Module):
    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float):
        super().__init__()
        self.rank, self.scale = rank, alpha / rank
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.multiplier = 1.0
        self.base_forward = None  # the original forward while applied

    def down_weight(self) -> torch.Tensor:
        raise NotImplementedError

    def up_weight(self) -> torch.Tensor:
        raise NotImplementedError

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        down = self.down_weight()
        h = torch.nn.functional.linear(self.dropout(x).to(down.dtype), down)
        return torch.nn.functional.linear(h, self.up_weight().to(h.dtype)) * (self.scale * self.multiplier)

    def delta_weight(self) -> torch.Tensor:
        return (self.up_weight().float() @ self.down_weight().float()) * (self.scale * self.multiplier)


class QRAdapter(_Adapter):
    """ΔW = s·Q·(ΔR⊙M). Only ΔR is a parameter; Q is a non-persistent buffer (it comes from
    the basis, never from a checkpoint of the adapter)."""

    def __init__(self, base: nn.Linear, q: torch.Tensor, alpha: float, mask: str, dropout: float = 0.0):
        rank = q.shape[1]
        super().__init__(base, rank, alpha, dropout)
        if q.shape[0] != base.out_features:
            raise ValueError(f"basis Q has {q.shape[0]} rows, the layer has {base.out_features} outputs")
        self.mask = mask
        self.register_buffer("q", q.detach().to(torch.float32).clone(), persistent=False)
        self.delta_r = nn.Parameter(torch.zeros(rank, base.in_features))

    def down_weight(self) -> torch.Tensor:
        return apply_mask(self.delta_r, self.mask)

    def up_weight(self) -> torch.Tensor:
        return self.q


class LoRAAdapter(_Adapter):
    """kohya's LoRA: down kaiming-uniform, up zero, ΔW = (alpha/r)·up·down."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__(base, rank, alpha, dropout)
        self.down = nn.Parameter(torch.empty(rank, base.in_features))
        nn.init.kaiming_uniform_(self.down, a=math.sqrt(5))
        self.up = nn.Parameter(torch.zeros(base.out_features, rank))

    def down_weight(self) -> torch.Tensor:
        return self.down

    def up_weight(self) -> torch.Tensor:
        return self.up


class AdapterNetwork(nn.Module):
    """All adapters of one training run, keyed by layer name, applied by patching forwards."""

    def __init__(self, adapters: Mapping[str, _Adapter], bases: Mapping[str, nn.Linear]):
        super().__init__()
        self.names = list(adapters)
        self.adapters = nn.ModuleList(adapters[n] for n in self.names)
        self._bases = dict(bases)  # not submodules: the base model is not ours to save or move
        self.applied = False

    @classmethod
    def qrlora(cls, modules: Mapping[str, nn.Linear], q: Mapping[str, torch.Tensor], alpha: float, mask: str,
               dropout: float = 0.0) -> "AdapterNetwork":
        missing = [n for n in modules if n not in q]
        if missing:
            raise ValueError(f"the basis has no Q for {len(missing)} target layers (first: {missing[0]})")
        return cls({n: QRAdapter(m, q[n], alpha, mask, dropout) for n, m in modules.items()}, modules)

    @classmethod
    def lora(cls, modules: Mapping[str, nn.Linear], rank: int, alpha: float, dropout: float = 0.0) -> "AdapterNetwork":
        return cls({n: LoRAAdapter(m, rank, alpha, dropout) for n, m in modules.items()}, modules)

    def items(self):
        return zip(self.names, self.adapters)

    def apply(self) -> None:
        if self.applied:
            return
        for name, adapter in self.items():
            base = self._bases[name]
            adapter.base_forward = base.forward

            def forward(x, _base=adapter.base_forward, _adapter=adapter):
                return _base(x) + _adapter.delta(x).to(x.dtype)

            base.forward = forward
        self.applied = True

    def remove(self) -> None:
        for name, adapter in self.items():
            if adapter.base_forward is not None:
                self._bases[name].forward = adapter.base_forward
                adapter.base_forward = None
        self.applied = False

    def set_multiplier(self, value: float) -> None:
        for adapter in self.adapters:
            adapter.multiplier = value

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.trainable_parameters())

    def adapter_state(self) -> dict[str, torch.Tensor]:
        """The trained tensors, under stable names (for resume)."""
        out = {}
        for name, adapter in self.items():
            for pname, p in adapter.named_parameters():
                out[f"{name}.{pname}"] = p.detach().float().cpu().contiguous()
        return out

    def check_adapter_state(self, state: Mapping[str, torch.Tensor], source: str) -> None:
        """Raise a UserError naming both sides when ``state`` was saved by a different network
        (other layers, another rank), instead of a tensor-size error deep in ``copy_``."""
        mine = {f"{name}.{pname}": tuple(p.shape) for name, adapter in self.items()
                for pname, p in adapter.named_parameters()}
        if set(state) != set(mine):
            missing = sorted(set(mine) - set(state))
            extra = sorted(set(state) - set(mine))
            raise UserError(f"{source} holds adapters for other layers than this config: {len(missing)} of this"
                            f" config's are missing (first: {missing[:1]}), {len(extra)} are not in this config"
                            f" (first: {extra[:1]})")
        for key, shape in mine.items():
            theirs = tuple(state[key].shape)
            if theirs != shape:
                raise UserError(f"{source} was trained with rank {_rank_of(key, theirs)} ({key} has shape {theirs}),"
                                f" this config has rank {_rank_of(key, shape)} (shape {shape});"
                                " resume with the network settings of that run")

    def load_adapter_state(self, state: Mapping[str, torch.Tensor]) -> None:
        self.check_adapter_state(state, "the adapter state")
        with torch.no_grad():
            for name, adapter in self.items():
                for pname, p in adapter.named_parameters():
                    p.copy_(state[f"{name}.{pname}"])

    def delta_r(self) -> dict[str, torch.Tensor]:
        """QR-LoRA: the masked ΔR of every layer (what a ΔR file stores)."""
        return {n: a.down_weight().detach().float().cpu() for n, a in self.items() if isinstance(a, QRAdapter)}

    def lora_factors(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(ups, downs) of every layer: for LoRA its trained factors; for QR-LoRA (Q, ΔR)."""
        ups = {n: a.up_weight().detach().float().cpu() for n, a in self.items()}
        downs = {n: a.down_weight().detach().float().cpu() for n, a in self.items()}
        return ups, downs


def _rank_of(key: str, shape: tuple[int, ...]) -> int:
    """The rank dimension of a trained tensor: rows of ΔR/down, columns of up."""
    return shape[1] if key.endswith(".up") else shape[0]
