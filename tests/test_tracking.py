"""Tracking: TensorBoard's configuration text and hyper-parameters, Weights & Biases (offline, the real client)
only when asked, and the run folder's figure of its curves."""
import glob
import json
import os
import shutil
import sys
import time

import pytest
from helpers import args_for, read_log

import main_finetune
from util.errors import UserError
from util.tracking import CURVES


@pytest.fixture(scope='module')
def wandb_run(workdir, tmp_path_factory):
    out = str(workdir.root / 'wandb')
    env = {'WANDB_MODE': 'offline', 'WANDB_SILENT': 'true', 'WANDB_CONFIG_DIR': str(tmp_path_factory.mktemp('wb')),
           'WANDB_CACHE_DIR': str(tmp_path_factory.mktemp('wbc'))}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        main_finetune.run(args_for(workdir, out, '--mode', 'distill', '--log_wandb', '--wandb_name', 'tiny', epochs=2))
        import wandb
        wandb.teardown()  # W&B's service process finishes writing the run file (as at the end of a process)
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    return out


def offline_records(out):
    """The records of the run's offline .wandb file (W&B's transaction log: a 7-byte header, then LevelDB-log
    records in 32 KiB blocks, each a CRC, a length, a type and a piece of a wandb_internal_pb2.Record)."""
    from wandb.proto import wandb_internal_pb2

    paths = glob.glob(os.path.join(out, 'wandb', 'offline-run-*', 'run-*.wandb'))
    assert len(paths) == 1, paths
    with open(paths[0], 'rb') as f:
        data = f.read()
    assert data[:4] == b':W&B'
    records, piece, pos, block = [], b'', 7, 32768
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # no header fits in the block's rest: it is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], 'little'), data[pos + 6]
        if kind == 0:
            break
        piece += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(piece)
            records.append(record)
            piece = b''
    return records


def finished_records(out, wait_s=60.0):
    """The run file's records once it holds the run's exit record: W&B's service process writes the file, and
    may still be writing it when the run's finish() returns on a loaded machine."""
    deadline = time.time() + wait_s
    while True:
        records = offline_records(out)
        kinds = [r.WhichOneof('record_type') for r in records]
        if 'exit' in kinds or time.time() > deadline:
            return records, kinds
        time.sleep(0.5)


def test_wandb_offline_run_holds_the_scalars_and_the_configuration(wandb_run):
    history, config = [], {}
    records, kinds = finished_records(wandb_run)
    assert 'exit' in kinds, kinds
    for record in records:
        kind = record.WhichOneof('record_type')
        if kind == 'history':
            history.append({item.key or '/'.join(item.nested_key): json.loads(item.value_json)
                            for item in record.history.item})
        elif kind == 'config':
            config.update({item.key: json.loads(item.value_json) for item in record.config.update})
    log = read_log(wandb_run)
    epoch_ends = [h for h in history if 'perf/test_acc1' in h]
    assert [h['perf/test_acc1'] for h in epoch_ends] == pytest.approx([line['test_acc1'] for line in log]), kinds
    losses = [h['train/loss'] for h in history if 'train/loss' in h]
    assert len(losses) == 2 * 3  # --print_freq 2 of 6 steps, two epochs: the points TensorBoard gets
    assert config['mode'] == 'distill' and config['epochs'] == 2
    assert config['run_record'][0]['argv'][0] == 'main_finetune.py'


def test_tensorboard_has_the_configuration_and_the_hyper_parameters(wandb_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(wandb_run, size_guidance={'tensors': 0})
    events.Reload()
    text = events.Tensors('config/text_summary')[0].tensor_proto.string_val[0].decode()
    assert 'mode: distill' in text and 'epochs: 2' in text
    assert events.Scalars('hparams/test_acc1')[0].value == pytest.approx(read_log(wandb_run)[-1]['test_acc1'])
    plugins = events.PluginTagToContent('hparams')
    assert '_hparams_/experiment' in plugins and '_hparams_/session_start_info' in plugins


def test_a_run_without_log_wandb_starts_no_wandb_run(workdir, tmp_path, monkeypatch):
    """No W&B run and no wandb folder (timm.utils imports wandb itself wherever it is installed, so the module
    being loaded says nothing): wandb.init is never called."""
    import wandb

    calls = []
    monkeypatch.setattr(wandb, 'init', lambda *a, **k: calls.append(k))
    out = tmp_path / 'run'
    main_finetune.run(args_for(workdir, str(out), epochs=1))
    assert calls == [] and not (out / 'wandb').exists()


def test_log_wandb_without_the_package_is_one_error(workdir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, 'wandb', None)  # import wandb raises ImportError
    with pytest.raises(UserError, match='--log_wandb: the wandb package cannot be imported .*pip install wandb'):
        main_finetune.run(args_for(workdir, str(tmp_path / 'run'), '--log_wandb', epochs=1))
    assert not (tmp_path / 'run').exists()


def test_the_curves_figure_is_written_and_rewritten_at_each_epoch(workdir, wandb_run, tmp_path):
    path = os.path.join(wandb_run, CURVES)
    with open(path, 'rb') as f:
        first = f.read()
    assert first.startswith(b'\x89PNG\r\n\x1a\n')
    out = str(tmp_path / 'more')
    shutil.copytree(wandb_run, out, ignore=shutil.ignore_patterns('wandb*'))
    main_finetune.run(args_for(workdir, out, '--mode', 'distill', '--resume', 'allow', epochs=3))
    with open(os.path.join(out, CURVES), 'rb') as f:
        assert f.read() != first  # a third epoch drawn
    import matplotlib.image
    assert matplotlib.image.imread(os.path.join(out, CURVES)).shape[2] in (3, 4)
