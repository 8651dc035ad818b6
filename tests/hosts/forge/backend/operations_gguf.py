"""Stand-in of Forge backend/operations_gguf.py and the vendored packages_3rdparty/gguf/quants.py.

Forge (``dfdcbab``): ``ParameterGGUF`` is an ``nn.Parameter`` holding the raw GGUF blocks (uint8)
with ``gguf_cls`` (the quant class of its type, None for F16/F32), ``real_shape`` (what ``.shape``
returns), ``computation_dtype`` (float16 unless the layer computes in bfloat16) and ``baked``;
``.to()`` returns a copy (``copy_with_data``). ``dequantize_tensor(t)`` returns
``t.gguf_cls.dequantize_pytorch(t)`` (in ``computation_dtype``) or ``t`` itself.
quants.py ``__Quant.quantize_pytorch(data, parent)`` reshapes the merged weight into blocks and
sets ``parent.data`` to ``quantize_blocks_pytorch(...)``, which only ``Q4_0``, ``Q5_0`` and ``Q8_0``
implement; every other type (``Q4_1``, ``Q5_1``, the K-quants, ``BF16``, the IQ types) raises
``NotImplementedError`` asking for "Automatic (fp16 LoRA)".

Here the blocks are held already baked (what ``memory_management.bake_gguf_model`` does when the
model is loaded). Q8_0 and Q4_0 use GGUF's arithmetic (per 32 values one fp16 scale); Q4_K uses
its arithmetic (256-value super-blocks of eight 32-value sub-blocks, 6-bit scales and mins) with
a simpler byte layout; ``encode`` is what a GGUF converter does, not part of Forge.
"""

import torch

_NOT_IMPLEMENTED = ('Low bit LoRA for this data type is not implemented yet. Please select "Automatic (fp16 LoRA)" '
                    'in "Diffusion in Low Bits" (on the top line of this page) to use this LoRA.')


class _Quant:
    name = ""
    block_size = 32

    # packages_3rdparty/gguf/quants.py: __Quant.quantize_pytorch
    @classmethod
    def quantize_pytorch(cls, data, parent):
        if not parent.baked:
            raise ValueError("GGUF Tensor is not baked!")
        parent.data = cls.quantize_blocks_pytorch(data.reshape(-1, cls.block_size).float(), parent).contiguous()
        return parent

    @classmethod
    def quantize_blocks_pytorch(cls, blocks, parent):
        raise NotImplementedError(_NOT_IMPLEMENTED)

    @classmethod
    def bake(cls, parameter):
        parameter.baked = True

    # packages_3rdparty/gguf/quants.py: __Quant.dequantize_pytorch
    @classmethod
    def dequantize_pytorch(cls, x):
        if not x.baked:
            raise ValueError("GGUF Tensor is not baked!")
        return cls.decode(x.data).to(x.computation_dtype).view(x.real_shape)

    @classmethod
    def encode(cls, blocks):
        return cls.quantize_blocks_pytorch(blocks, None)


def _fp16_bytes(x):
    return x.to(torch.float16).contiguous().view(torch.uint8).view(x.shape[0], -1)


def _fp16_of(b):
    return b.contiguous().view(torch.float16).float()


class Q8_0(_Quant):
    name = "Q8_0"

    @classmethod
    def quantize_blocks_pytorch(cls, blocks, parent):  # d = absmax / 127, q = round(x / d)
        d = blocks.abs().amax(dim=1, keepdim=True) / 127
        q = torch.round(blocks * torch.where(d == 0, torch.zeros_like(d), 1 / d)).to(torch.int8)
        return torch.cat([_fp16_bytes(d), q.view(torch.uint8)], dim=1)

    @classmethod
    def decode(cls, data):
        return data[:, 2:].view(torch.int8).float() * _fp16_of(data[:, :2])


class Q4_0(_Quant):
    name = "Q4_0"

    @classmethod
    def quantize_blocks_pytorch(cls, blocks, parent):  # d = (signed absmax) / -8, q = clamp(x / d + 8.5)
        idx = blocks.abs().argmax(dim=1, keepdim=True)
        d = blocks.gather(1, idx) / -8
        q = torch.clamp(torch.trunc(blocks * torch.where(d == 0, torch.zeros_like(d), 1 / d) + 8.5), 0, 15).to(torch.uint8)
        packed = q[:, :16] | (q[:, 16:] << 4)
        return torch.cat([_fp16_bytes(d), packed], dim=1)

    @classmethod
    def decode(cls, data):
        packed = data[:, 2:]
        q = torch.cat([packed & 0x0F, packed >> 4], dim=1).float() - 8
        return q * _fp16_of(data[:, :2])


class Q4_K(_Quant):
    name = "Q4_K"
    block_size = 256

    @classmethod
    def encode(cls, blocks):  # x ≈ d·scale_j·q − dmin·min_j per 32-value sub-block
        sub = blocks.view(-1, 8, 32)
        low = sub.amin(dim=2).clamp(max=0)
        scale = (sub.amax(dim=2) - low) / 15
        d = scale.amax(dim=1, keepdim=True) / 63
        dmin = (-low).amax(dim=1, keepdim=True) / 63
        d16, dmin16 = d.half().float(), dmin.half().float()
        sc = torch.round(scale / torch.where(d16 == 0, torch.ones_like(d16), d16)).clamp(0, 63)
        mn = torch.round(-low / torch.where(dmin16 == 0, torch.ones_like(dmin16), dmin16)).clamp(0, 63)
        step = (d16 * sc).unsqueeze(2)
        q = torch.round((sub + (dmin16 * mn).unsqueeze(2)) / torch.where(step == 0, torch.ones_like(step), step))
        q = q.clamp(0, 15).to(torch.uint8).view(-1, 256)
        packed = q[:, :128] | (q[:, 128:] << 4)
        return torch.cat([_fp16_bytes(d16), _fp16_bytes(dmin16), sc.to(torch.uint8), mn.to(torch.uint8), packed], dim=1)

    @classmethod
    def decode(cls, data):
        d, dmin = _fp16_of(data[:, 0:2]), _fp16_of(data[:, 2:4])
        sc, mn = data[:, 4:12].float(), data[:, 12:20].float()
        packed = data[:, 20:]
        q = torch.cat([packed & 0x0F, packed >> 4], dim=1).float().view(-1, 8, 32)
        return (d.unsqueeze(2) * sc.unsqueeze(2) * q - (dmin * mn).unsqueeze(2)).view(-1, 256)


class BF16(_Quant):
    name = "BF16"
    block_size = 1

    @classmethod
    def encode(cls, blocks):
        return blocks.to(torch.bfloat16).view(torch.uint8).view(-1, 2)

    @classmethod
    def decode(cls, data):
        return data.contiguous().view(torch.bfloat16).float()


TYPES = {c.name: c for c in (Q8_0, Q4_0, Q4_K, BF16)}


# Forge backend/operations_gguf.py: ParameterGGUF


class ParameterGGUF(torch.nn.Parameter):
    def __new__(cls, data, gguf_cls=None, real_shape=None, computation_dtype=torch.float16, baked=True):
        p = super().__new__(cls, data, requires_grad=False)
        p.gguf_cls = gguf_cls
        p.real_shape = torch.Size(real_shape if real_shape is not None else data.shape)
        p.computation_dtype = computation_dtype
        p.baked = baked
        return p

    @property
    def shape(self):
        return self.real_shape

    def copy_with_data(self, data):
        return ParameterGGUF(data, self.gguf_cls, self.real_shape, self.computation_dtype, self.baked)

    def to(self, *args, **kwargs):
        return self.copy_with_data(self.data.to(*args, **kwargs).clone())

    @classmethod
    def quantized(cls, weight, type_name):
        """What loading a GGUF file of this type gives (the converter's work plus Forge's bake)."""
        kind = TYPES[type_name]
        return cls(kind.encode(weight.detach().float().reshape(-1, kind.block_size)), kind, weight.shape)


# Forge backend/operations_gguf.py: dequantize_tensor


def dequantize_tensor(tensor):
    if tensor is None or getattr(tensor, "gguf_cls", None) is None:
        return tensor
    return tensor.gguf_cls.dequantize_pytorch(tensor)
