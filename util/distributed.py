"""Distributed set-up (torchrun, srun, submitit) and the few collectives the training loop needs."""
from __future__ import annotations

import datetime
import os
import subprocess
from typing import Optional

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_dist() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def log(*msg, all_ranks: bool = False) -> None:
    """Print on rank 0 (or on every rank, prefixed by it), flushed at once: logs are read while jobs run."""
    if all_ranks and get_world_size() > 1:
        print(f"[rank {get_rank()}]", *msg, flush=True)
    elif is_main_process():
        print(*msg, flush=True)


def _first_slurm_host(nodelist: str) -> str:
    try:
        out = subprocess.run(['scontrol', 'show', 'hostnames', nodelist], capture_output=True, text=True, check=True)
        return out.stdout.split()[0]
    except (OSError, subprocess.CalledProcessError, IndexError):
        # a single host name, or the first of a plain comma-separated list
        return nodelist.split(',')[0]


def port_for_job(job_id: str) -> int:
    """A rendezvous port derived from a job id (same for every task of the job, and after a requeue)."""
    digits = ''.join(c for c in str(job_id) if c.isdigit())[-9:]
    return 20000 + int(digits or 0) % 20000


def _environment_from_slurm() -> None:
    """Fill torchrun's variables from an ``srun`` launch (one task per GPU)."""
    os.environ.setdefault('RANK', os.environ['SLURM_PROCID'])
    os.environ.setdefault('WORLD_SIZE', os.environ['SLURM_NTASKS'])
    os.environ.setdefault('LOCAL_RANK', os.environ.get('SLURM_LOCALID', '0'))
    os.environ.setdefault('MASTER_ADDR', _first_slurm_host(os.environ.get('SLURM_JOB_NODELIST', 'localhost')))
    os.environ.setdefault('MASTER_PORT', str(port_for_job(os.environ.get('SLURM_JOB_ID', '0'))))


def init_distributed_mode(args) -> dict:
    """Join the process group when the environment says the run has several processes; returns the resolved
    ``distributed``, ``rank``, ``world_size``, ``gpu`` and ``device`` (``cuda:<local rank>`` on CUDA).

    torchrun (and submitit, which exports the same variables) sets RANK / WORLD_SIZE / LOCAL_RANK;
    a bare ``srun`` sets SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID. Otherwise the run is single-process.
    NCCL on CUDA, gloo on CPU.
    """
    if 'RANK' not in os.environ and int(os.environ.get('SLURM_NTASKS', '1')) > 1 and 'SLURM_PROCID' in os.environ:
        _environment_from_slurm()
    if 'RANK' not in os.environ or int(os.environ.get('WORLD_SIZE', '1')) <= 1:
        return dict(distributed=False, rank=0, world_size=1, gpu=0, device=args.device)
    rank, world_size = int(os.environ['RANK']), int(os.environ['WORLD_SIZE'])
    gpu = int(os.environ.get('LOCAL_RANK', '0'))
    use_cuda = str(args.device).startswith('cuda')
    device = f'cuda:{gpu}' if use_cuda else args.device
    if use_cuda:
        torch.cuda.set_device(gpu)
    backend = 'nccl' if use_cuda else 'gloo'
    dist.init_process_group(backend=backend, init_method=args.dist_url, world_size=world_size, rank=rank,
                            timeout=datetime.timedelta(minutes=args.dist_timeout))
    log(f"distributed: {world_size} processes, backend {backend}, rendezvous {args.dist_url}")
    return dict(distributed=True, rank=rank, world_size=world_size, gpu=gpu, device=device)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if is_dist():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def barrier() -> None:
    if is_dist():
        dist.barrier()


def destroy() -> None:
    if is_dist():
        dist.destroy_process_group()


def broadcast_object(obj: Optional[object]) -> object:
    """Rank 0's value of ``obj`` on every rank."""
    if not is_dist():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_object(obj: object) -> list:
    """Every rank's ``obj``, in rank order, on every rank."""
    if not is_dist():
        return [obj]
    out: list = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def ddp_ignore(module: torch.nn.Module, names: list[str]) -> None:
    """Make DistributedDataParallel neither broadcast nor reduce these parameters and buffers of ``module``
    (fully qualified names), e.g. a frozen teacher's.

    PyTorch has no public API for this: DDP reads the names that its static method
    ``_set_params_and_buffers_to_ignore_for_model`` stores on the module ("a workaround ... until the API is
    finalized", pytorch/pytorch#43690). This is the one place that calls it;
    tests/test_private_apis.py fails if PyTorch changes the method or stops honouring it."""
    from torch.nn.parallel import DistributedDataParallel
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, names)


def wrap_ddp(model: torch.nn.Module, distributed: bool, gpu: int, device: str) -> torch.nn.Module:
    """DDP over the student's gradients (when the run is ``distributed``, on local ``gpu`` of a CUDA ``device``);
    the frozen teacher is neither broadcast nor reduced."""
    if not distributed:
        return model
    if model.teacher is not None:
        ignored = [f'teacher.{n}' for n, _ in model.teacher.named_parameters()]
        ignored += [f'teacher.{n}' for n, _ in model.teacher.named_buffers()]
        ddp_ignore(model, ignored)
    device_ids = [gpu] if str(device).startswith('cuda') else None
    return DistributedDataParallel(model, device_ids=device_ids,
                                   find_unused_parameters=model.may_leave_student_parameters_unused)
