"""--eval with --ensemble_with: each model alone and the ensemble, beside a checkpoint of this project or a
plain classifier checkpoint."""
import os

import pytest

import main_finetune


def test_ensemble_of_a_model_with_itself_equals_the_model(one_epoch_runs):
    runs = one_epoch_runs
    checkpoint = os.path.join(runs.out['distill'], 'checkpoint.pth')
    stats = main_finetune.run(['--eval', '--resume', checkpoint, '--ensemble_with', checkpoint, '--data_path',
                               runs.data, '--device', 'cpu', '--num_workers', '0'])
    for key in ('acc1', 'acc5', 'loss'):
        assert stats[f'ensemble_test_{key}'] == pytest.approx(stats[f'test_{key}'], rel=1e-6)
        assert stats[f'other_test_{key}'] == pytest.approx(stats[f'test_{key}'], rel=1e-6)


def test_ensemble_with_a_plain_classifier_checkpoint(one_epoch_runs):
    """The paper's case: the distilled student beside the (fine-tuned) teacher, a checkpoint without args."""
    runs = one_epoch_runs
    checkpoint = os.path.join(runs.out['distill'], 'checkpoint.pth')
    stats = main_finetune.run(['--eval', '--resume', checkpoint, '--ensemble_with', runs.teacher, '--data_path',
                               runs.data, '--device', 'cpu', '--num_workers', '0'])
    assert {'test_acc1', 'other_test_acc1', 'ensemble_test_acc1'} <= set(stats)
    assert stats['ensemble_test_images'] == 18
