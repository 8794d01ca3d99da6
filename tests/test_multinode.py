"""Two nodes on one machine: submitit_finetune.py and select_wild_data.py on a two-node Slurm cluster, and
torchrun with one agent per node.

The cluster is tests/slurm/cluster.sh start --nodes 2: its own munged, slurmctld and two slurmd
(slurm-node1, slurm-node2), each pinned to its own core, the node names in /etc/hosts; it is stopped by
process id and /etc/hosts restored at the end, also when a test fails. The torchrun agents are pinned the
same way, one core each, and meet on the loopback.

Every run trains the same tiny distill job (2 ranks, 2 epochs of 12 steps), so their final weights must
agree bit for bit: the Slurm job with the torchrun job, and a preempted or stopped job with the
uninterrupted one. A sitecustomize.py on PYTHONPATH (which sbatch and srun pass on) records every
checkpoint rename with the writer's rank and node, and holds the job where a test must act: at a step
until the test has signalled, or just before a checkpoint's rename until the test has killed a task.
"""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from helpers import (
    ROOT,
    TINY_ARCH,
    free_port,
    kwargs_flags,
    make_image_folder,
    make_teacher_checkpoint,
    read_text,
    squeue_state,
    tiny_args,
    wait_for,
)

import main_finetune
import select_wild_data
from util.checkpoint import load_training_checkpoint, next_position
from util.pretrained import read_checkpoint

pytestmark = pytest.mark.slow

SLURM_NODES = 2  # the cluster fixture's (tests/conftest.py)
STEPS = 12  # 48 training images, batch 2 on each of 2 ranks
GATE_STEP = 3  # the step at which a signalled job is held until the signal is sent

SITECUSTOMIZE = '''
"""Instrumentation of tests/test_multinode.py, switched on by environment variables.

MULTINODE_TEST_EVENTS=FILE: append "EVENT RANK NODE RESTART PATH" lines to FILE: "renamed" after each rename
    onto a .pth file (the last step of a checkpoint write), "holding" and "gate" as below.
MULTINODE_TEST_HOLD_RENAME=N: the process's N-th rename onto a .pth file never happens: it records "holding"
    and sleeps until it is killed.
MULTINODE_TEST_GATE=STEP:FILE: after its optimizer step STEP the process records "gate" and waits until FILE
    exists.
"""
import os
import time

_events = os.environ.get('MULTINODE_TEST_EVENTS')


def _record(event, path):
    slurm = 'SLURM_JOB_ID' in os.environ
    who = [event, os.environ.get('RANK', '-'), os.environ.get('SLURMD_NODENAME', '-'),
           os.environ.get('SLURM_RESTART_COUNT', '0') if slurm else '-']
    fd = os.open(_events, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    os.write(fd, (' '.join(who) + f' {path}\\n').encode())
    os.close(fd)


if _events:
    _replace = os.replace
    _hold = int(os.environ.get('MULTINODE_TEST_HOLD_RENAME', '0'))
    _renames = 0

    def _observed_replace(src, dst, *args, **kwargs):
        global _renames
        checkpoint = str(dst).endswith('.pth')
        if checkpoint:
            _renames += 1
            if _renames == _hold:
                _record('holding', dst)
                while True:
                    time.sleep(60)
        _replace(src, dst, *args, **kwargs)
        if checkpoint:
            _record('renamed', dst)

    os.replace = _observed_replace

if os.environ.get('MULTINODE_TEST_GATE'):
    from torch.optim.optimizer import register_optimizer_step_post_hook

    _gate_step, _gate_file = os.environ['MULTINODE_TEST_GATE'].split(':', 1)
    _steps = 0

    def _gate(*_):
        global _steps
        _steps += 1
        if _steps == int(_gate_step):
            _record('gate', _gate_file)
            while not os.path.exists(_gate_file):
                time.sleep(0.05)

    register_optimizer_step_post_hook(_gate)
'''


class Work:
    """Data, teacher, the instrumentation folder and the runs' folders, shared by the module's tests."""

    def __init__(self, root):
        self.root = root
        self.data = make_image_folder(os.path.join(root, 'data'))
        self.teacher = make_teacher_checkpoint(os.path.join(root, 'teacher.pth'))
        self.instrumentation = os.path.join(root, 'instrumentation')
        os.makedirs(self.instrumentation)
        with open(os.path.join(self.instrumentation, 'sitecustomize.py'), 'w') as f:
            f.write(SITECUSTOMIZE)

    def env(self, events: str, gate: str = '', hold_rename: int = 0) -> dict:
        """The environment of a run: one thread per process, the instrumentation recording into ``events``."""
        pythonpath = os.pathsep.join(p for p in (self.instrumentation, os.environ.get('PYTHONPATH')) if p)
        env = {k: v for k, v in os.environ.items() if not k.startswith('MULTINODE_TEST_')}
        env.update(OMP_NUM_THREADS='1', PYTHONPATH=pythonpath, MULTINODE_TEST_EVENTS=events)
        if gate:
            env['MULTINODE_TEST_GATE'] = f'{GATE_STEP}:{gate}'
        if hold_rename:
            env['MULTINODE_TEST_HOLD_RENAME'] = str(hold_rename)
        return env

    def train_flags(self, out: str) -> list[str]:
        return tiny_args(self.data, out, '--mode', 'distill', '--finetune', self.teacher, '--lr', '3e-3',
                         '--drop_path', '0.1', '--batch_size', '2', '--print_freq', '1', '--dist_eval',
                         '--resume', 'allow', epochs=2)


@pytest.fixture(scope='module')
def work(tmp_path_factory):
    return Work(str(tmp_path_factory.mktemp('multinode')))


def student(path: str) -> dict:
    return load_training_checkpoint(path)['model']


def assert_same_weights(path: str, reference: str) -> None:
    got, want = student(path), student(reference)
    assert got.keys() == want.keys()
    differing = [k for k in want if not torch.equal(got[k], want[k])]
    assert not differing, f"{path} differs from {reference} in {differing[:5]}"


def events_of(path: str, kind: str = 'renamed') -> list[tuple[str, str, str, str]]:
    """(rank, Slurm node, Slurm restart, file name) of the instrumentation's events of this kind ('-' outside
    Slurm)."""
    lines = [line.split(' ', 4) for line in read_text(path).splitlines() if line]
    return [(*fields[1:4], os.path.basename(fields[4])) for fields in lines if fields[0] == kind]


def assert_instrumented(logs: str) -> None:
    assert 'Error in sitecustomize' not in logs, logs[-3000:]


def log_lines(folder: str) -> list[str]:
    return [line for line in read_text(os.path.join(folder, 'log.txt')).splitlines() if line]


# ---- torchrun: one agent per node ------------------------------------------------------------------
def node_cores(node: int) -> set[int]:
    """The cores of node 0 or 1: an equal share of this process's, as tests/slurm/cluster.sh deals them;
    empty when there are fewer cores than nodes."""
    cores = sorted(os.sched_getaffinity(0))
    share = len(cores) // 2
    return set(cores[node * share:(node + 1) * share])


def pinned(node: int) -> list[str]:
    """taskset onto this node's own cores, where the machine has some for each node."""
    cores = node_cores(node)
    return ['taskset', '-c', ','.join(map(str, sorted(cores)))] if cores and shutil.which('taskset') else []


def start_agents(work: Work, out: str, rendezvous: str, env: dict) -> list[subprocess.Popen]:
    """Two torchrun agents (--nnodes 2, one process each) running main_finetune.py; static rendezvous
    (--node_rank, --master_addr) or c10d (--rdzv_endpoint) on the loopback. Their output goes to
    <out>.agent<node>.log."""
    port = str(free_port())
    agents = []
    for node in (0, 1):
        if rendezvous == 'static':
            launch = ['--node_rank', str(node), '--master_addr', '127.0.0.1', '--master_port', port]
        else:
            launch = ['--rdzv_backend', 'c10d', '--rdzv_endpoint', f'127.0.0.1:{port}', '--rdzv_id', 'multinode-test']
        cmd = [*pinned(node), sys.executable, '-m', 'torch.distributed.run', '--nnodes', '2', '--nproc_per_node', '1',
               *launch, os.path.join(ROOT, 'main_finetune.py'), *work.train_flags(out)]
        log = open(f'{out}.agent{node}.log', 'a')
        agents.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                                       start_new_session=True))
        log.close()
    return agents


def wait_agents(agents: list[subprocess.Popen], timeout: float) -> list[int]:
    deadline = time.time() + timeout
    try:
        return [agent.wait(timeout=max(deadline - time.time(), 1)) for agent in agents]
    finally:
        for agent in agents:  # only on a timeout: the agents and their workers, by process group
            if agent.poll() is None:
                os.killpg(agent.pid, signal.SIGKILL)
                agent.wait()


@pytest.fixture(scope='module')
def torchrun_reference(work):
    """The uninterrupted job: two agents, static rendezvous."""
    out = os.path.join(work.root, 'torchrun_reference')
    codes = wait_agents(start_agents(work, out, 'static', work.env(out + '.events')), timeout=300)
    logs = read_text(out + '.agent0.log') + read_text(out + '.agent1.log')
    assert codes == [0, 0], logs[-6000:]
    return out, logs


def test_multinode_torchrun_two_agents_train_with_one_writer(torchrun_reference):
    out, logs = torchrun_reference
    assert_instrumented(logs)
    assert 'distributed: 2 processes, backend gloo' in logs
    assert len(log_lines(out)) == 2
    assert json.loads(log_lines(out)[-1])['test_images'] == 18  # sharded evaluation counts every image once
    written = events_of(out + '.events')
    assert written and {rank for rank, *_ in written} == {'0'}, written
    assert len([f for f in os.listdir(out) if f.startswith('events.out.tfevents')]) == 1


def test_multinode_torchrun_stop_mid_epoch_resumes_to_the_same_weights(work, torchrun_reference):
    """SIGTERM to node 1's agent only, while both ranks are held after step 3: both agree on the stop, save one
    checkpoint at that step and exit; two new agents (c10d rendezvous) resume there and end with the
    uninterrupted job's weights."""
    out = os.path.join(work.root, 'torchrun_stopped')
    events, gate = out + '.events', out + '.go'
    agents = start_agents(work, out, 'c10d', work.env(events, gate=gate))
    logs = lambda: read_text(out + '.agent0.log') + read_text(out + '.agent1.log')  # noqa: E731
    try:
        wait_for(lambda: len(events_of(events, 'gate')) == 2, 240, f'both ranks to finish step {GATE_STEP}')
        agents[1].send_signal(signal.SIGTERM)
        wait_for(lambda: 'SIGTERM received' in logs(), 60, 'the worker of node 1 to take the signal')
    except AssertionError:
        print(logs()[-6000:])
        raise
    finally:
        open(gate, 'w').close()
        codes = wait_agents(agents, timeout=120)
    assert_instrumented(logs())
    assert codes[0] != 0 and codes[1] != 0, logs()[-6000:]
    stops = re.findall(r'stopped: checkpoint written at epoch (\d+), step (\d+)', logs())
    assert stops == [('0', str(GATE_STEP))] * 2, logs()[-6000:]  # each rank's own line
    assert events_of(events) == [('0', '-', '-', 'checkpoint.pth')]  # the stop's checkpoint, once, by rank 0
    assert next_position(load_training_checkpoint(os.path.join(out, 'checkpoint.pth'))) == (0, GATE_STEP)

    codes = wait_agents(start_agents(work, out, 'c10d', work.env(events)), timeout=300)
    assert codes == [0, 0], logs()[-6000:]
    assert f"resumed from {out}/checkpoint.pth: epoch 0, step {GATE_STEP}" in logs()
    assert len(log_lines(out)) == 2
    assert_same_weights(os.path.join(out, 'checkpoint.pth'), os.path.join(torchrun_reference[0], 'checkpoint.pth'))


# ---- Slurm: two nodes -------------------------------------------------------------------------------
class Job:
    """A two-node submitit_finetune.py job of the tiny distill run (one task per node, CPU, gloo)."""

    def __init__(self, work: Work, cluster: dict, name: str, *extra: str, gate: bool = False, hold_rename: int = 0):
        self.dir = os.path.join(work.root, name)
        self.events, self.gate = self.dir + '.events', self.dir + '.go'
        self.env = {**work.env(self.events, gate=self.gate if gate else '', hold_rename=hold_rename), **cluster}
        submit = subprocess.run(
            [sys.executable, os.path.join(ROOT, 'submitit_finetune.py'), '--job_dir', self.dir, '--nodes', '2',
             '--ngpus', '1', '--ncpus', '1', '--mem_gb', '1', '--timeout', '30', '--partition', 'debug',
             *work.train_flags(self.dir), *extra],
            env=self.env, capture_output=True, text=True, timeout=120, cwd=work.root)
        assert submit.returncode == 0, submit.stdout + submit.stderr
        self.id = re.search(r'Submitted job_id: (\d+)', submit.stdout).group(1)

    def out(self, task: int) -> str:
        return read_text(os.path.join(self.dir, f'{self.id}_{task}_log.out'))

    def err(self, task: int) -> str:
        return read_text(os.path.join(self.dir, f'{self.id}_{task}_log.err'))

    def logs(self) -> str:
        return ''.join(self.out(t) + self.err(t) for t in (0, 1))

    def state(self) -> tuple[str, str]:
        return squeue_state(self.id, self.env)

    def wait_for(self, predicate, timeout: float, what: str) -> None:
        try:
            wait_for(predicate, timeout, what, interval=0.2)
        except AssertionError:
            print(self.logs()[-8000:])
            raise

    def wait_gone(self, timeout: float) -> None:
        self.wait_for(lambda: self.state()[0] == 'GONE', timeout, f'job {self.id} to end')

    def checkpoint(self) -> str:
        return os.path.join(self.dir, 'checkpoint.pth')


@pytest.fixture(scope='module')
def slurm_job(work, cluster):
    """The uninterrupted job, run to the end."""
    job = Job(work, cluster, 'slurm_uninterrupted')
    job.wait_gone(300)
    return job


def test_multinode_slurm_job_trains_on_both_nodes(work, slurm_job, torchrun_reference, tmp_path):
    job = slurm_job
    assert_instrumented(job.logs())
    tasks = [re.search(r'task (\d)/2 on (\S+) \(node (\d) of 2, local rank (\d), restart 0\), rendezvous (\S+):(\d+)',
                       job.out(t)) for t in (0, 1)]
    assert all(tasks), job.logs()[-6000:]
    assert [m.groups()[:4] for m in tasks] == [('0', 'slurm-node1', '1', '0'), ('1', 'slurm-node2', '2', '0')]
    # the rendezvous is the first node of the job's node list, on a port both tasks derive from the job id
    assert {m.group(5, 6) for m in tasks} == {('slurm-node1', tasks[0].group(6))}
    assert 'distributed: 2 processes, backend gloo' in job.out(0)
    assert all('Job completed successfully' in job.out(t) for t in (0, 1))
    written = events_of(job.events)
    assert written and {w[:3] for w in written} == {('0', 'slurm-node1', '0')}, written
    assert {w[3] for w in written} == {'checkpoint.pth', 'checkpoint-1.pth'}
    assert len(log_lines(job.dir)) == 2
    assert len([f for f in os.listdir(job.dir) if f.startswith('events.out.tfevents')]) == 1
    # the same job under torchrun ends with the same weights
    assert_same_weights(job.checkpoint(), os.path.join(torchrun_reference[0], 'checkpoint.pth'))

    # --dist_eval over the two nodes (the last epoch's evaluation) = one process on the same checkpoint
    last = json.loads(log_lines(job.dir)[-1])
    single = main_finetune.run(['--eval', '--resume', job.checkpoint(), '--data_path', work.data, '--device', 'cpu',
                                '--num_workers', '0', '--output_dir', str(tmp_path / 'eval')])
    assert last['test_images'] == single['test_images'] == 18
    assert (last['test_acc1'], last['test_acc5']) == (single['test_acc1'], single['test_acc5'])  # exact counts
    # the loss adds up float32 batch sums, whose rounding depends on how the images are batched
    assert last['test_loss'] == pytest.approx(single['test_loss'], rel=1e-6, abs=0)


def test_multinode_slurm_preempted_job_resumes_on_both_nodes_to_the_same_weights(work, cluster, slurm_job):
    """USR2 (what Slurm sends before a time limit or a preemption) while both tasks are held after step 3: both
    stop at that step, rank 0 writes one checkpoint and requeues the job, which resumes there on both nodes
    and ends with the uninterrupted job's weights."""
    job = Job(work, cluster, 'slurm_preempted', gate=True)
    try:
        job.wait_for(lambda: len(events_of(job.events, 'gate')) == 2, 240, f'both tasks to finish step {GATE_STEP}')
        subprocess.run(['scancel', '--signal=USR2', job.id], env=job.env, check=True)
        job.wait_for(lambda: all('SIGUSR2 received' in job.err(t) for t in (0, 1)), 60, 'both tasks to take USR2')
    finally:
        open(job.gate, 'w').close()
    job.wait_for(lambda: job.state() == ('PENDING', 'BeginTime'), 120, 'the job to save and requeue itself')
    subprocess.run(['scontrol', 'update', f'JobId={job.id}', 'StartTime=now'], env=job.env, check=True)
    job.wait_gone(300)
    assert_instrumented(job.logs())

    for task in (0, 1):
        assert re.findall(r'preempted: state saved at epoch (\d+), step (\d+)', job.out(task)) == \
            [('0', str(GATE_STEP))], job.logs()[-6000:]
    written = events_of(job.events)
    assert [w for w in written if w[2] == '0'] == [('0', 'slurm-node1', '0', 'checkpoint.pth')]  # the stop's, once
    assert {w[:3] for w in written} == {('0', 'slurm-node1', '0'), ('0', 'slurm-node1', '1')}
    for task, node in ((0, 'slurm-node1'), (1, 'slurm-node2')):
        assert f'task {task}/2 on {node} (node {task + 1} of 2, local rank 0, restart 1)' in job.out(task)
    assert f'resumed from {job.checkpoint()}: epoch 0, step {GATE_STEP}' in job.out(0)
    # the step counter runs on without a step trained twice or skipped
    for e in (0, 1):
        assert re.findall(rf'Epoch \[{e}\] \[(\d+)/{STEPS}\]', job.out(0)) == [str(i) for i in range(1, STEPS + 1)]
    assert len(log_lines(job.dir)) == 2
    assert all(job.out(t).count('Job completed successfully') == 1 for t in (0, 1))
    assert_same_weights(job.checkpoint(), slurm_job.checkpoint())


def task_pid(job_id: str, task: int) -> int:
    """The process id of a job's Python task (on this machine, where every node runs)."""
    for pid in filter(str.isdigit, os.listdir('/proc')):
        try:
            with open(f'/proc/{pid}/environ', 'rb') as f:
                environ = dict(e.split(b'=', 1) for e in f.read().split(b'\0') if b'=' in e)
            with open(f'/proc/{pid}/cmdline', 'rb') as f:
                cmdline = f.read()
        except OSError:
            continue
        if (b'submitit.core._submit' in cmdline and environ.get(b'SLURM_JOB_ID') == job_id.encode()
                and environ.get(b'SLURM_PROCID') == str(task).encode()):
            return int(pid)
    raise AssertionError(f"no process of job {job_id}, task {task}")


def test_multinode_slurm_task_killed_on_one_node_ends_the_job(work, cluster):
    """SIGKILL of the task on the second node (as the OOM killer would) while rank 0 is writing a checkpoint
    (held just before its rename): the whole job ends within Slurm's KillWait, the error names the node and the
    task, the job is not requeued, and checkpoint.pth is the previous, complete checkpoint."""
    job = Job(work, cluster, 'slurm_killed', '--checkpoint_minutes', '1e-6', hold_rename=4)  # one per step
    job.wait_for(lambda: events_of(job.events, 'holding'), 240, 'rank 0 to write its fourth checkpoint')
    pids = [task_pid(job.id, task) for task in (0, 1)]
    if node_cores(0):  # each node's task runs on that node's own cores
        assert [os.sched_getaffinity(pid) for pid in pids] == [node_cores(0), node_cores(1)]
    os.kill(pids[1], signal.SIGKILL)
    killed = time.time()
    job.wait_gone(120)
    assert time.time() - killed < 40  # KillWait (10 s) and the daemons' latency
    assert 'srun: error: slurm-node2: task 1: Killed' in job.err(0), job.logs()[-6000:]
    assert 'restart 1' not in job.logs()  # a crash is not a preemption: the job is not requeued
    assert events_of(job.events) == [('0', 'slurm-node1', '0', 'checkpoint.pth')] * 3
    assert next_position(load_training_checkpoint(job.checkpoint())) == (0, 3)
    assert len([f for f in os.listdir(job.dir) if f.startswith('checkpoint.pth.')]) == 1  # the killed write's


def test_multinode_slurm_selection_sharded_over_two_nodes_equals_one_process(work, cluster, tmp_path):
    """select_wild_data.py under a bare srun (one task per node): the ranks score alternate chunks, each on
    its own node, and the selection equals one process's."""
    flags = ['--teacher', work.teacher, '--model', 'vit_base_patch16_224', '--model_kwargs', *kwargs_flags(TINY_ARCH),
             '--nb_classes', '3', '--input_size', '32', '--wild_path', os.path.join(work.data, 'train'),
             '--num_select', '10', '--chunk_size', '7', '--batch_size', '5', '--num_workers', '0', '--device', 'cpu']
    single = select_wild_data.main(select_wild_data.get_args_parser().parse_args(
        [*flags, '--output', str(tmp_path / 'single.pth')]))
    events = str(tmp_path / 'events')
    proc = subprocess.run(
        ['srun', '--nodes', '2', '--ntasks', '2', '--ntasks-per-node', '1', '--kill-on-bad-exit=1', '--time', '5',
         sys.executable, os.path.join(ROOT, 'select_wild_data.py'), *flags, '--output', str(tmp_path / 'sharded.pth')],
        env={**work.env(events), **cluster}, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert_instrumented(proc.stderr)
    assert '2 rank(s)' in proc.stdout
    chunks = sorted((name, rank, node) for rank, node, _, name in events_of(events) if name.startswith('chunk_'))
    assert chunks == [(f'chunk_{k:06d}.pth', str(k % 2), f'slurm-node{k % 2 + 1}') for k in range(7)]
    sharded = read_checkpoint(str(tmp_path / 'sharded.pth'))
    assert torch.equal(sharded['selected'], single['selected'])
    assert torch.equal(sharded['scores']['output'], single['scores']['output'])
    assert sharded['scores']['probe'].keys() == single['scores']['probe'].keys()
    assert all(torch.equal(v, single['scores']['probe'][b]) for b, v in sharded['scores']['probe'].items())
