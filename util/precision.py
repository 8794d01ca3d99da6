"""The precision rule of every entry point: bf16 autocast on CUDA (no loss scaling), none elsewhere."""
from __future__ import annotations

import torch

from util.errors import UserError

AMP_DTYPES = {'bf16': torch.bfloat16, 'fp16': torch.float16, 'none': None}


def default_amp(device: str | torch.device) -> str:
    """The ``--amp`` value a run gets when it gives none: 'bf16' on a CUDA device, else 'none'."""
    return 'bf16' if str(device).startswith('cuda') else 'none'


TEACHER_DTYPES = {'float32': torch.float32, 'bf16': torch.bfloat16}


def teacher_dtype(requested: str, amp: str, mode_name: str, uses_teacher: bool) -> str:
    """--teacher_dtype resolved: ``auto`` holds the frozen teacher's weights in bf16 where the run computes in bf16
    (--amp bf16, the default on CUDA: its matrix products read the weights in bf16 anyway), else in float32."""
    if requested != 'auto' and not uses_teacher:
        raise UserError(f"--teacher_dtype {requested}: --mode {mode_name} has no teacher: drop it")
    if requested == 'bf16' and amp != 'bf16':
        raise UserError(f"--teacher_dtype bf16 holds the teacher's weights in bf16, which only a run that computes "
                        f"in bf16 can use, and this one has --amp {amp}: add --amp bf16, or leave --teacher_dtype auto")
    if requested == 'auto':
        return 'bf16' if amp == 'bf16' and uses_teacher else 'float32'
    return requested


def parameter_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def hold_teacher(teacher: torch.nn.Module | None, dtype: str) -> str | None:
    """The frozen teacher's parameters (not its buffers, e.g. rotary position tables, which stay as they are)
    converted to ``dtype``; the line that says so (None when nothing changed)."""
    if teacher is None or dtype == 'float32':
        return None
    before = parameter_bytes(teacher)
    for p in teacher.parameters():
        p.data = p.data.to(TEACHER_DTYPES[dtype])
    return (f"teacher: weights held in {dtype} (--teacher_dtype), {parameter_bytes(teacher) / 2**20:.1f} MiB "
            f"instead of {before / 2**20:.1f} MiB")
