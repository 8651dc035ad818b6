"""Stand-in of modules/devices.py: ``cpu``, ``device`` and ``dtype`` (the dtype Lora stores its
up/down matrices in; fp16 with half precision, fp32 with ``--no-half`` / ``--precision full``,
which is what these tests model)."""
import torch

cpu = torch.device("cpu")
device = torch.device("cpu")
dtype = torch.float32
