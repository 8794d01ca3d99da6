"""Launch main_finetune.py on SLURM through submitit: one task per GPU, preemption-safe, self-requeueing.

    python submitit_finetune.py --job_dir $JOB_DIR --nodes 8 --batch_size 32 \\
        --model dual_vit_large_patch16 --mode distill --end_layer -6 --atd_weight 3.0 \\
        --finetune mae_pretrain_vit_large.pth --resume allow ... --data_path $IMAGENET

Every flag of main_finetune.py is accepted, plus the job's own (--job_dir, --nodes, --ngpus, ...).
Checkpoints, log.txt and TensorBoard events go to the job directory unless --output_dir / --log_dir
say otherwise; submitit's logs are <job_dir>/<job id>_<task>_log.out / .err.

On preemption or time-out SLURM sends USR2 to every task. The tasks agree on a step at their next
sync point (every --print_freq steps), save the full state there (position inside the epoch,
optimizer, EMA, scaler, RNG), and rank 0 requeues the job, which resumes from that state. Between
signals, checkpoint.pth is refreshed every --checkpoint_minutes, which bounds what a crash loses.
"""
from __future__ import annotations

import argparse
import getpass
import importlib
import itertools
import os
import signal
import sys
import time
from pathlib import Path

import submitit

import main_finetune
from util.args import HelpFormatter, Parser, parse_command
from util.config import Config
from util.errors import UserError, run_cli
from util.output import CHECKPOINT, RUN_FOLDER_FIX, check_writable
from util.run_record import command_line

REPO = os.path.dirname(os.path.abspath(__file__))
SHARED_FOLDER = '/checkpoint'  # the cluster-wide folder some sites provide; jobs default to a folder in it
DEFAULT_OUTPUT = './output_dir'


def preemption_signal() -> signal.Signals:
    """The signal SLURM sends before preemption or time-out, on which submitit checkpoints and requeues:
    SIGUSR2 unless the SUBMITIT_PREEMPT_SIGNAL environment variable names another. Read from submitit's
    public class attribute ``JobEnvironment.USR_SIG`` (its ``_usr_sig()`` helper is private);
    tests/test_private_apis.py checks that the two agree."""
    return signal.Signals['SIG' + submitit.JobEnvironment.USR_SIG]


def command_parser(entry=main_finetune, script: str = 'submitit_finetune.py', description: str = __doc__
                   ) -> Parser:
    """The flags of the ``entry`` script (main_finetune.py, or main_detection.py for submitit_detection.py) and the
    SLURM job's."""
    parser = Parser(f'python {script}', parents=[entry.get_args_parser()], description=description,
                    formatter_class=HelpFormatter)
    g = parser.add_argument_group('SLURM job')
    g.add_argument('--job_dir', default='', type=str,
                   help='job folder for submitit logs, checkpoints and log.txt ("%%j" becomes the job id); '
                        f'default {SHARED_FOLDER}/<user>/experiments/%%j where that shared folder exists')
    g.add_argument('--nodes', default=2, type=int, help='number of nodes to request')
    g.add_argument('--ngpus', default=8, type=int, help='GPUs per node (one task per GPU)')
    g.add_argument('--ncpus', default=10, type=int, help='CPUs per GPU task (data loading workers run on these)')
    g.add_argument('--mem_gb', default=40, type=float, help='memory per GPU task, in GB')
    g.add_argument('--timeout', default=4320, type=int, help='job time limit in minutes')
    g.add_argument('--partition', default=None, type=str, help='SLURM partition (default: the cluster\'s)')
    g.add_argument('--account', default=None, type=str, help='SLURM account to charge')
    g.add_argument('--qos', default=None, type=str, help='SLURM quality of service')
    g.add_argument('--constraint', default=None, type=str, help='SLURM node constraint, e.g. volta32gb')
    g.add_argument('--use_volta32', action='store_true', help='request 32 GB V100s (sets --constraint volta32gb)')
    g.add_argument('--exclude', default=None, type=str, help='nodes to exclude, e.g. node[01-03]')
    g.add_argument('--comment', default=None, type=str, help='comment attached to the job')
    g.add_argument('--name', default='attention-transfer', type=str, help='job name')
    g.add_argument('--cluster', default='slurm', choices=['slurm', 'local', 'debug'],
                   help='slurm: submit with sbatch; local: run the same tasks as processes on this machine; '
                        'debug: run in this process')
    g.add_argument('--signal_delay', default=120, type=int,
                   help='seconds between the preemption / time-out signal and the kill (SLURM --signal=USR2@N)')
    g.add_argument('--max_requeues', default=20, type=int,
                   help='stop requeuing after the job was restarted this many times (preemptions, time-outs, '
                        'node failures); it then ends with its error in the log')
    return parser


def parse_args(argv=None, entry=main_finetune, script: str = 'submitit_finetune.py',
               description: str = __doc__) -> argparse.Namespace:
    args, given = parse_command(command_parser(entry, script, description), argv)
    return Config.of(args, explicit_flags=given, command=command_line(script, argv))


def resolve_job_dir(job_dir: str) -> str:
    if job_dir:
        return job_dir
    shared = Path(SHARED_FOLDER) / getpass.getuser()
    if shared.is_dir():
        return str(shared / 'experiments' / '%j')
    raise UserError(f"--job_dir is required: no shared folder {shared} was found on this cluster to put the job in")


def existing_part(folder: str) -> str:
    """The part of a job folder known before submission: up to the first component holding "%j"."""
    parts = Path(folder).parts
    known = [p for p in itertools.takewhile(lambda p: '%j' not in p, parts)]
    return str(Path(*known)) if known else '.'


def restarts() -> int:
    """How many times SLURM has requeued this job (preemption, time-out, node failure)."""
    return int(os.environ.get('SLURM_RESTART_COUNT', '0') or 0)


class Trainer:
    """What submitit runs in every task: the entry script's main() (``entry``: its module, main_finetune or
    main_detection) under the job's distributed environment."""

    def __init__(self, args: argparse.Namespace, entry: str = 'main_finetune') -> None:
        # a plain namespace and a module name: the job unpickles them before its sys.path holds this project's modules
        self.args, self.entry = argparse.Namespace(**vars(args)), entry

    def __call__(self) -> dict:
        if REPO not in sys.path:
            sys.path.insert(0, REPO)
        entry = importlib.import_module(self.entry)  # the job's own imports, after its sys.path is set
        from util.config import Config
        from util.run_control import Preempted

        args = self._setup_environment(Config.of(self.args))
        if restarts() and not args.resume:  # requeued (e.g. a node failure): the job continues its own run
            args = args.replace(resume='allow')
        if restarts() > args.max_requeues:
            raise RuntimeError(f"the job was restarted {restarts()} times (more than --max_requeues "
                               f"{args.max_requeues}); not training again. See the earlier logs in {args.job_dir}")
        self._install_preemption_handler(args)
        try:
            return entry.main(args)
        except Preempted as stop:
            signal.alarm(0)
            self._requeue_after_save(stop)
            return {}

    def checkpoint(self) -> submitit.helpers.DelayedSubmission | None:
        """Called by submitit on rank 0 before requeuing: the same job, resuming from its last checkpoint."""
        if restarts() >= self.args.max_requeues:
            print(f"not requeuing: the job has already been restarted {restarts()} times "
                  f"(--max_requeues {self.args.max_requeues})", flush=True)
            return None
        last = Path(self.args.output_dir.replace('%j', submitit.JobEnvironment().job_id)) / CHECKPOINT
        resume = str(last) if last.is_file() else self.args.resume
        return submitit.helpers.DelayedSubmission(type(self)(argparse.Namespace(**{**vars(self.args),
                                                                                    'resume': resume}), self.entry))

    # ---- inside the job ----------------------------------------------------------------------
    def _setup_environment(self, args: Config) -> Config:
        """RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT from submitit's JobEnvironment; returns the
        configuration with the job's own folders in place of %j."""
        from util.distributed import port_for_job

        env = submitit.JobEnvironment()
        job_dir = args.job_dir.replace('%j', str(env.job_id))
        args = args.replace(output_dir=args.output_dir.replace('%j', str(env.job_id)) if args.output_dir else job_dir,
                            log_dir=args.log_dir.replace('%j', str(env.job_id)) if args.log_dir else job_dir,
                            job_dir=job_dir)
        os.environ['RANK'] = str(env.global_rank)
        os.environ['WORLD_SIZE'] = str(env.num_tasks)
        os.environ['LOCAL_RANK'] = str(env.local_rank)
        os.environ['MASTER_ADDR'] = env.hostnames[0]
        os.environ.setdefault('MASTER_PORT', str(port_for_job(env.job_id)))
        node = os.environ.get('SLURMD_NODENAME', env.hostname)  # the name squeue and --exclude use
        print(f"task {env.global_rank}/{env.num_tasks} on {node} (node {env.node + 1} of {env.num_nodes}, local "
              f"rank {env.local_rank}, restart {restarts()}), "
              f"rendezvous {os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}", flush=True)
        return args

    def _install_preemption_handler(self, args: argparse.Namespace) -> None:
        """On USR2, ask the training loop to save and stop at its next sync point.

        submitit's own handler (checkpoint + requeue) runs afterwards on rank 0; if the loop does not
        reach a sync point in half the signal delay (e.g. the signal came during evaluation), an alarm
        runs it directly, and the job resumes from the last periodic checkpoint instead."""
        from util.run_control import request_stop

        usr2 = preemption_signal()
        self._submitit_handler = signal.getsignal(usr2)
        fallback = self._submitit_handler

        def on_preemption(signum, frame):
            request_stop()
            signal.alarm(max(args.signal_delay // 2, 1))
            # os.write: print() is not safe in a handler that may have interrupted another print
            os.write(sys.stderr.fileno(), f"{usr2.name} received (preemption or time limit): saving at the next "
                                          f"step that is a multiple of --print_freq, then requeuing\n".encode())

        def on_alarm(signum, frame):
            print("the training loop did not stop in time: requeuing from the last checkpoint", flush=True)
            if callable(fallback):
                fallback(usr2, frame)

        signal.signal(signal.SIGALRM, on_alarm)
        signal.signal(usr2, on_preemption)

    def _requeue_after_save(self, stop) -> None:
        """All ranks saved at the same step; rank 0 requeues (submitit's handler), the others wait to be stopped."""
        env = submitit.JobEnvironment()
        print(f"preempted: state saved at epoch {stop.epoch}, step {stop.step}; requeuing", flush=True)
        if env.global_rank == 0 and callable(self._submitit_handler):
            self._submitit_handler(preemption_signal(), None)  # checkpoint(), requeue, exit
        time.sleep(max(self.args.signal_delay, 60))


def build_executor(args: argparse.Namespace, job_dir: str) -> submitit.AutoExecutor:
    cuda = str(args.device).startswith('cuda')
    executor = submitit.AutoExecutor(folder=job_dir, cluster=args.cluster, slurm_max_num_timeout=args.max_requeues)
    params = dict(
        name=args.name, nodes=args.nodes, tasks_per_node=args.ngpus, gpus_per_node=args.ngpus if cuda else 0,
        cpus_per_task=args.ncpus, mem_gb=args.mem_gb * args.ngpus, timeout_min=args.timeout,
        slurm_signal_delay_s=args.signal_delay, slurm_srun_args=['--kill-on-bad-exit=1'],
    )
    constraint = 'volta32gb' if args.use_volta32 else args.constraint
    for key, value in (('partition', args.partition), ('account', args.account), ('qos', args.qos),
                       ('constraint', constraint), ('exclude', args.exclude), ('comment', args.comment)):
        if value:
            params[f'slurm_{key}'] = value
    if args.cluster != 'slurm':
        params = {k: v for k, v in params.items() if not k.startswith('slurm_') and k != 'gpus_per_node'}
        if args.cluster == 'debug':
            params.pop('tasks_per_node')
    executor.update_parameters(**params)
    return executor


def main(argv=None, entry=main_finetune, script: str = 'submitit_finetune.py',
         description: str = __doc__) -> submitit.Job:
    """Submit the ``entry`` script's run (main_finetune by default) as a SLURM job."""
    args = parse_args(argv, entry, script, description)
    job_dir = resolve_job_dir(args.job_dir)
    args = args.replace(output_dir=job_dir if args.output_dir == DEFAULT_OUTPUT else args.output_dir,
                        log_dir=job_dir if args.log_dir in (None, DEFAULT_OUTPUT) else args.log_dir, job_dir=job_dir)
    entry.resolve_args(args, read_resume=False)  # fail on a bad flag now, not after the queue
    for flag, folder in (('--job_dir', job_dir), ('--output_dir', args.output_dir), ('--log_dir', args.log_dir)):
        check_writable(existing_part(folder), f"{flag} {existing_part(folder)!r}", RUN_FOLDER_FIX)
    executor = build_executor(args, job_dir)  # submitit puts the job id in place of %j
    job = executor.submit(Trainer(args, entry.__name__))
    logs = job_dir.replace('%j', str(job.job_id))
    print(f"Submitted job_id: {job.job_id}")
    print(f"logs: {logs}/{job.job_id}_<task>_log.out and .err; checkpoints and log.txt in "
          f"{args.output_dir.replace('%j', str(job.job_id))}", flush=True)
    if args.cluster == 'debug':
        job.result()  # the debug executor runs the job here, in this process
    return job


if __name__ == '__main__':
    run_cli(main)
