"""Export a trained student as a standalone timm model: model.safetensors and config.json.

    python tools/export_student.py --checkpoint output_dir/checkpoint.pth --output exported/student [--ema]

Any checkpoint of a plain, distill or probe run works. The folder loads with timm alone:

    model = timm.create_model('local-dir:exported/student', pretrained=True)
    # or, naming the architecture and its arguments as config.json records them (num_classes included):
    config = json.load(open('exported/student/config.json'))
    model = timm.create_model(config['architecture'], pretrained=True, **config['model_args'],
                              pretrained_cfg_overlay=dict(file='exported/student/model.safetensors',
                                                          num_classes=config['num_classes']))

config.json's pretrained_cfg holds the input normalisation the student was trained with (mean, std:
the teacher's), as timm's resolve_data_config reads it.

A copy-mode student uses its teacher's attention maps in every forward pass and cannot run alone,
so its export is refused.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from timm.models import save_for_hf  # noqa: E402

from modes import get_mode  # noqa: E402
from util.args import HelpFormatter  # noqa: E402
from util.checkpoint import holds_ema, student_weights  # noqa: E402
from util.datasets import mae_eval_crop_pct  # noqa: E402
from util.errors import UserError, run_cli  # noqa: E402
from util.model_record import recorded_spec  # noqa: E402
from util.pretrained import load_exact, read_checkpoint  # noqa: E402


class ExportError(UserError):
    """A checkpoint that cannot be exported as a standalone model."""


def export(checkpoint_path: str, output: str, use_ema: bool = False) -> dict:
    """Write the student to ``output``; returns the architecture written to config.json."""
    ckpt = read_checkpoint(checkpoint_path, flag='--checkpoint')
    spec = recorded_spec(ckpt)
    if spec is None:
        raise ExportError(f"{checkpoint_path} does not record its model (no 'args' of main_finetune.py)")
    mode = get_mode(spec.mode)
    if mode.needs_teacher(evaluating=True):
        raise ExportError(
            f"{checkpoint_path} is a {mode.name} student: in every forward pass it uses its teacher's "
            f"{mode.transfer.exposes} in place of its own, so it cannot run without the teacher. Train with "
            "--mode distill for a standalone student; to use this one, keep the checkpoint (it holds the teacher "
            "too) and evaluate it with main_finetune.py --eval --resume.")
    if use_ema and not holds_ema(ckpt):
        raise ExportError(f"{checkpoint_path} holds no EMA weights (the run had no --ema); export without --ema")
    key = 'model_ema' if use_ema else 'model'
    arch, size = spec.student, spec.img_size
    model_args = dict(arch.kwargs, img_size=size, global_pool=arch.global_pool)
    student = arch.create(spec.num_classes, size)
    load_exact(student, student_weights(ckpt, use_ema), f"checkpoint {checkpoint_path!r} ({key})")
    student.pretrained_cfg = {k: v for k, v in student.pretrained_cfg.items()
                              if k not in ('tag', 'hf_hub_id', 'url', 'license')}
    # the normalisation the student was trained with (the teacher's; ImageNet's for older checkpoints)
    mean, std = tuple(spec.mean), tuple(spec.std)
    data_config = dict(input_size=(3, size, size), interpolation='bicubic', mean=mean, std=std,
                       crop_pct=spec.eval_crop_pct or mae_eval_crop_pct(size), crop_mode='center')
    try:
        save_for_hf(student, output, model_args=model_args, safe_serialization=True, data_config=data_config)
    except OSError as e:
        raise ExportError(f"--output {output!r}: cannot write the exported model there ({type(e).__name__}: "
                          f"{e.strerror or e}); give a folder you can write to") from e
    return {'architecture': arch.name, 'num_classes': spec.num_classes, 'model_args': model_args, 'weights': key,
            'mean': mean, 'std': std}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser('python tools/export_student.py', description=__doc__,
                                     formatter_class=HelpFormatter)
    parser.add_argument('--checkpoint', required=True, help='checkpoint written by main_finetune.py')
    parser.add_argument('--output', required=True, help='folder to write model.safetensors and config.json to')
    parser.add_argument('--ema', action='store_true', help='export the EMA weights instead of the raw ones')
    args = parser.parse_args(argv)
    info = export(args.checkpoint, args.output, args.ema)
    kwargs = ', '.join(f'{k}={v!r}' for k, v in info['model_args'].items())
    print(f"wrote {args.output}/model.safetensors and config.json ({info['weights']} weights of "
          f"{info['architecture']}, {info['num_classes']} classes). Load it with timm alone:\n"
          f"  timm.create_model('local-dir:{args.output}', pretrained=True)\n"
          f"  timm.create_model('{info['architecture']}', pretrained=True, num_classes={info['num_classes']}, "
          f"{kwargs}, pretrained_cfg_overlay=dict(file='{args.output}/model.safetensors', "
          f"num_classes={info['num_classes']}))")


if __name__ == '__main__':
    run_cli(main)
