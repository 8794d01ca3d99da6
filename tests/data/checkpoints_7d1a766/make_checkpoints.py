"""How the checkpoints beside this file were written (revision 7d1a766, one CPU thread):

    cd tests && python data/checkpoints_7d1a766/make_checkpoints.py WORK_FOLDER

WORK_FOLDER receives the data, the teacher and the runs; the kept files are copied here, and command.json /
expected.json are written. It is kept as the record of how they were made, not to be run by the tests."""
import json
import os
import shutil
import sys

import pytest
import timm
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))  # tests/, for helpers
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(HERE))))  # the repository

from helpers import kwargs_flags, make_image_folder, make_teacher_checkpoint, read_log, stop_at_forward, tiny_args  # noqa: E402

import main_finetune  # noqa: E402
from util.run_control import Preempted, clear_stop  # noqa: E402

ARCH = {'patch_size': 8, 'embed_dim': 24, 'depth': 2, 'num_heads': 2}
DISTILL = ['--lr', '3e-3', '--mode', 'distill', '--drop_path', '0.2', '--ema', '0.9', '--mixup', '0.8',
           '--cutmix', '1.0', '--print_freq', '1', '--checkpoint_minutes', '0', '--save_every', '1']
COPY = ['--lr', '3e-3', '--mode', 'copy', '--print_freq', '1']
EPOCHS = {'distill': 2, 'copy': 1}
STOP_AT_FORWARD = 6 + 3  # the stop is requested during epoch 1, step 3 of 6 (1-based forward count)


def argv(data, teacher, out, extra, epochs):
    a = tiny_args(data, out, '--finetune', teacher, *extra, epochs=epochs)
    a[a.index('--model_kwargs') + 1:a.index('--input_size')] = kwargs_flags(ARCH)
    return a


EVAL_KEYS = ('epoch', 'test_acc1', 'test_loss', 'ema_test_acc1', 'ema_test_loss')


def last_eval(out, epoch=None):
    """The run's evaluation as log.txt records it: its last line, or epoch's."""
    line = read_log(out)[-1 if epoch is None else epoch]
    return {k: v for k, v in line.items() if k in EVAL_KEYS}


def main(work):
    torch.set_num_threads(1)
    os.makedirs(work, exist_ok=True)
    data = make_image_folder(os.path.join(work, 'data'))
    teacher = make_teacher_checkpoint(os.path.join(work, 'teacher.pth'), **ARCH)
    full, part, copy = (os.path.join(work, n) for n in ('distill_full', 'distill_stopped', 'copy'))
    torch.manual_seed(0)
    main_finetune.run(argv(data, teacher, full, DISTILL, EPOCHS['distill']))
    mp = pytest.MonkeyPatch()
    stop_at_forward(mp, STOP_AT_FORWARD)
    torch.manual_seed(0)
    try:
        main_finetune.run(argv(data, teacher, part, DISTILL, EPOCHS['distill']))
        raise AssertionError('the requested stop did not stop the run')
    except Preempted as stop:
        assert (stop.epoch, stop.step) == (1, 3), (stop.epoch, stop.step)
    finally:
        clear_stop()
        mp.undo()
    torch.manual_seed(0)
    main_finetune.run(argv(data, teacher, copy, COPY, EPOCHS['copy']))

    shutil.copy(os.path.join(full, 'checkpoint-0.pth'), os.path.join(HERE, 'distill_epoch0.pth'))
    shutil.copy(os.path.join(part, 'checkpoint.pth'), os.path.join(HERE, 'distill_mid_epoch1.pth'))
    final = torch.load(os.path.join(full, 'checkpoint.pth'), map_location='cpu', weights_only=False)
    torch.save({k: final[k] for k in ('model', 'model_ema')}, os.path.join(HERE, 'distill_final_weights.pth'))
    shutil.copy(os.path.join(copy, 'checkpoint.pth'), os.path.join(HERE, 'copy_final.pth'))

    # the distill student of distill_epoch0.pth on a fixed input, as a plain timm ViT with those weights
    epoch0 = torch.load(os.path.join(HERE, 'distill_epoch0.pth'), map_location='cpu', weights_only=False)
    vit = timm.create_model('vit_base_patch16_224', pretrained=False, num_classes=3, img_size=32, global_pool='avg',
                            **ARCH)
    vit.load_state_dict(epoch0['model'])
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = vit.eval()(x)
    # the mid-epoch checkpoint was never evaluated by its run: its evaluation by --eval of this revision
    mid = main_finetune.run(['--eval', '--resume', os.path.join(HERE, 'distill_mid_epoch1.pth'), '--data_path', data,
                             '--output_dir', os.path.join(work, 'eval_mid'), '--device', 'cpu', '--batch_size', '8',
                             '--num_workers', '0'])
    with open(os.path.join(HERE, 'command.json'), 'w') as f:
        json.dump({'arch': ARCH, 'distill': DISTILL, 'copy': COPY, 'epochs': EPOCHS,
                   'stop_at_forward': STOP_AT_FORWARD, 'teacher': teacher, 'data': data, 'threads': 1,
                   'torch': torch.__version__, 'timm': timm.__version__}, f, indent=1)
    with open(os.path.join(HERE, 'expected.json'), 'w') as f:
        json.dump({'distill_epoch0.pth': last_eval(full, 0),
                   'distill_mid_epoch1.pth (--eval of 7d1a766)': {k: mid[k] for k in EVAL_KEYS if k in mid}, 'distill_final': last_eval(full),
                   'copy_final.pth': last_eval(copy),
                   'distill_epoch0_student_logits': {'input': 'torch.randn(2, 3, 32, 32, generator=seed 0)',
                                                     'logits': logits.tolist()}}, f, indent=1)


if __name__ == '__main__':
    main(sys.argv[1])
