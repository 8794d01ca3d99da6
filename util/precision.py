"""The precision rule of every entry point: bf16 autocast on CUDA (no loss scaling), none elsewhere."""
from __future__ import annotations

import torch

AMP_DTYPES = {'bf16': torch.bfloat16, 'fp16': torch.float16, 'none': None}


def default_amp(device: str | torch.device) -> str:
    """The ``--amp`` value a run gets when it gives none: 'bf16' on a CUDA device, else 'none'."""
    return 'bf16' if str(device).startswith('cuda') else 'none'
