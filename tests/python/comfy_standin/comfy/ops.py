"""Stand-in for comfy/ops.py: the `operations` classes ComfyUI's text encoders are built with.

Upstream: comfy/ops.py manual_cast (Linear, LayerNorm, Embedding, ... that cast weights to the
input's dtype per op, and skip weight init), scaled_fp8_ops(...) (the same for scaled fp8
files), cast_to. Here the layers are torch's own (constructed on any device, meta included);
the stand-in never runs a text encoder locally, so the casting is left out.
"""

import torch


class manual_cast:
    Linear = torch.nn.Linear
    LayerNorm = torch.nn.LayerNorm
    Embedding = torch.nn.Embedding


def scaled_fp8_ops(fp8_matrix_mult=False, scale_input=False, override_dtype=None):
    return manual_cast


def cast_to(weight, dtype=None, device=None, non_blocking=False, copy=False):
    return weight.to(device=device, dtype=dtype, copy=copy)
