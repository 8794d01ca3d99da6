"""--eval with --ensemble_with: each model alone and the ensemble, beside a checkpoint of this project or a
plain classifier checkpoint."""
import os

import pytest
import timm
import torch
from helpers import TINY_ARCH
from timm.models.vision_transformer import VisionTransformer

import main_finetune
from util.pretrained import read_checkpoint


def test_ensemble_of_a_model_with_itself_equals_the_model(one_epoch_runs):
    runs = one_epoch_runs
    checkpoint = os.path.join(runs.out['distill'], 'checkpoint.pth')
    stats = main_finetune.run(['--eval', '--resume', checkpoint, '--ensemble_with', checkpoint, '--data_path',
                               runs.data, '--device', 'cpu', '--num_workers', '0'])
    for key in ('acc1', 'acc5', 'loss'):
        assert stats[f'ensemble_test_{key}'] == pytest.approx(stats[f'test_{key}'], rel=1e-6)
        assert stats[f'other_test_{key}'] == pytest.approx(stats[f'test_{key}'], rel=1e-6)


def test_ensemble_with_a_plain_classifier_checkpoint(one_epoch_runs, monkeypatch):
    """The paper's case: the distilled student beside the (fine-tuned) teacher, a checkpoint without args. Each
    model's and the ensemble's top-1 and loss equal those computed here from the two models' logits on the
    evaluated images: the ensemble's prediction is the average of the two softmax outputs, its loss that
    average's negative log-likelihood; the two models' logits are those of a plain timm ViT holding the
    checkpoint's student and of one holding the teacher checkpoint's weights."""
    runs = one_epoch_runs
    checkpoint = os.path.join(runs.out['distill'], 'checkpoint.pth')
    seen, forward = [], VisionTransformer.forward

    def recording(self, x):
        out = forward(self, x)
        seen.append((x.detach().clone(), out.detach().float()))
        return out

    monkeypatch.setattr(VisionTransformer, 'forward', recording)
    stats = main_finetune.run(['--eval', '--resume', checkpoint, '--ensemble_with', runs.teacher, '--data_path',
                               runs.data, '--device', 'cpu', '--num_workers', '0'])
    monkeypatch.undo()
    assert stats['ensemble_test_images'] == 18
    # per batch: the student, then the teacher; the validation images in folder order (6 a class)
    images = torch.cat([x for x, _ in seen[0::2]])
    assert torch.equal(images, torch.cat([x for x, _ in seen[1::2]])) and len(images) == 18
    targets = torch.arange(3).repeat_interleave(6)
    student, teacher = (timm.create_model('vit_base_patch16_224', pretrained=False, num_classes=3, img_size=32,
                                          global_pool='avg', **TINY_ARCH).eval() for _ in range(2))
    student.load_state_dict(read_checkpoint(checkpoint)['model'])
    teacher.load_state_dict(torch.load(runs.teacher, weights_only=True)['model'])
    with torch.no_grad():
        logits = {'test_': student(images), 'other_test_': teacher(images)}
    for prefix, recorded in (('test_', seen[0::2]), ('other_test_', seen[1::2])):
        torch.testing.assert_close(torch.cat([out for _, out in recorded]), logits[prefix], rtol=0, atol=1e-5)
    probs = {prefix: torch.softmax(v.double(), dim=1) for prefix, v in logits.items()}
    probs['ensemble_test_'] = (probs['test_'] + probs['other_test_']) / 2
    assert not torch.allclose(probs['test_'], probs['other_test_'], atol=1e-2)  # two different models
    for prefix, p in probs.items():
        acc1 = 100.0 * float((p.argmax(dim=1) == targets).double().mean())
        loss = float(-p[torch.arange(18), targets].log().mean())
        assert stats[prefix + 'acc1'] == pytest.approx(acc1, abs=1e-9), prefix
        assert stats[prefix + 'loss'] == pytest.approx(loss, rel=1e-5), prefix
