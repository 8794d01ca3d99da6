"""Library internals this project relies on where no public API exists; each test fails loudly when the
library changes them (util/distributed.ddp_ignore, submitit_finetune.preemption_signal)."""
import signal

import submitit
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from submitit_finetune import preemption_signal
from util.distributed import ddp_ignore


class Pair(nn.Module):
    def __init__(self):
        super().__init__()
        self.teacher = nn.Linear(4, 4)
        self.student = nn.Linear(4, 2)
        self.teacher.register_buffer('stat', torch.zeros(1))

    def forward(self, x):
        return self.student(self.teacher(x))


def test_ddp_ignores_what_ddp_ignore_names(tmp_path):
    """DDP must take the teacher's names from the module as _set_params_and_buffers_to_ignore_for_model
    stores them: neither broadcast nor reduced."""
    assert not dist.is_initialized()
    dist.init_process_group('gloo', store=dist.FileStore(str(tmp_path / 'store'), 1), rank=0, world_size=1)
    try:
        model = Pair()
        ignored = ['teacher.weight', 'teacher.bias', 'teacher.stat']
        ddp_ignore(model, ignored)
        ddp = DistributedDataParallel(model)
        assert ddp.parameters_to_ignore == set(ignored)
        assert all(getattr(p, '_ddp_ignored', False) for p in model.teacher.parameters())
        assert not any(getattr(p, '_ddp_ignored', False) for p in model.student.parameters())
        ddp(torch.randn(3, 4)).sum().backward()  # the ignored teacher still gets its local gradient, unreduced
    finally:
        dist.destroy_process_group()


def test_preemption_signal_is_submitits():
    assert preemption_signal() == signal.SIGUSR2  # submitit's default (SUBMITIT_PREEMPT_SIGNAL unset)
    assert preemption_signal() == submitit.JobEnvironment._usr_sig()  # the private helper it stands in for

