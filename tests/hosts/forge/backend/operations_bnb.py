"""Stand-in of Forge backend/operations_bnb.py (bitsandbytes nf4 / fp4).

Forge (``dfdcbab``): a 4-bit linear is a ``ForgeLoader4Bit`` module whose ``weight`` is a
``ForgeParams4bit`` (bitsandbytes ``Params4bit``: packed uint8, ``quant_state`` with one absmax per
``blocksize`` = 64 values, ``quant_type`` "nf4" or "fp4", ``bnb_quantized``).
``functional_dequantize_4bit(weight)`` moves the weight to CUDA and calls bitsandbytes'
``dequantize_4bit``; ``ForgeLoader4Bit.reload_weight(weight)`` wraps the merged float weight in a
new ``ForgeParams4bit`` and quantizes it by moving it to CUDA (``.cuda()``), so Forge's offline
LoRA merge on nf4 needs a GPU. Here both run in torch on the CPU with bitsandbytes' code books
(NF4: the 16 normal-float levels; FP4: the E2M1 levels scaled to 1) and the same block size.
"""

import torch

NF4 = torch.tensor([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
                    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
                    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                    0.7229568362236023, 1.0])
FP4 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]) / 6
BLOCK = 64


class QuantState:
    def __init__(self, absmax, shape, quant_type, dtype):
        self.absmax, self.shape, self.quant_type, self.dtype = absmax, torch.Size(shape), quant_type, dtype


def _quantize(weight, quant_type):
    code = NF4 if quant_type == "nf4" else FP4
    blocks = weight.detach().float().reshape(-1, BLOCK)
    absmax = blocks.abs().amax(dim=1, keepdim=True)
    scaled = blocks / torch.where(absmax == 0, torch.ones_like(absmax), absmax)
    idx = (scaled.unsqueeze(-1) - code).abs().argmin(dim=-1).to(torch.uint8).view(-1)
    packed = (idx[0::2] << 4) | idx[1::2]
    return packed, QuantState(absmax.view(-1), weight.shape, quant_type, weight.dtype)


# bitsandbytes Params4bit / Forge backend/operations_bnb.py: ForgeParams4bit


class ForgeParams4bit(torch.nn.Parameter):
    def __new__(cls, packed, quant_state, quant_type="nf4", blocksize=BLOCK):
        p = super().__new__(cls, packed, requires_grad=False)
        p.quant_state, p.quant_type, p.blocksize, p.bnb_quantized = quant_state, quant_type, blocksize, True
        return p

    def to(self, *args, **kwargs):
        return ForgeParams4bit(self.data.to(*args, **kwargs).clone(), self.quant_state, self.quant_type, self.blocksize)

    @classmethod
    def quantized(cls, weight, quant_type):
        packed, state = _quantize(weight, quant_type)
        return cls(packed, state, quant_type)


# Forge backend/operations_bnb.py: functional_dequantize_4bit


def functional_dequantize_4bit(weight):
    if not weight.bnb_quantized:
        return weight
    code = NF4 if weight.quant_type == "nf4" else FP4
    packed = weight.data
    idx = torch.stack([packed >> 4, packed & 0x0F], dim=1).view(-1).long()
    values = code[idx].view(-1, weight.blocksize) * weight.quant_state.absmax.view(-1, 1)
    return values.view(weight.quant_state.shape).to(weight.quant_state.dtype)


# Forge backend/operations_bnb.py: ForgeLoader4Bit


class ForgeLoader4Bit(torch.nn.Module):
    def __init__(self, weight, bias, quant_type):
        super().__init__()
        self.weight = ForgeParams4bit.quantized(weight, quant_type)
        self.bias = None if bias is None else torch.nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.quant_type = quant_type

    def reload_weight(self, weight):  # the real one quantizes by weight.cuda()
        self.weight = ForgeParams4bit.quantized(weight.to(self.weight.quant_state.dtype), self.weight.quant_type)
        return self
