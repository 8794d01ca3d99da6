"""torchrun entry point for the distributed tests.

Runs main_finetune.run() with the given arguments, and after every epoch saves this rank's student
weights to ``<output_dir>/rank<r>_epoch<e>.pt`` so the test can compare ranks. With the environment
variable NAN_ON_RANK=r, rank r's loss becomes NaN from its 4th step on.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import engine_finetune  # noqa: E402
import main_finetune  # noqa: E402
from util.losses import TransferCriterion  # noqa: E402

rank = int(os.environ['RANK'])
argv = sys.argv[1:]
output_dir = argv[argv.index('--output_dir') + 1]
train_one_epoch = engine_finetune.train_one_epoch


def recording_train_one_epoch(step, loader, epoch, *args, **kwargs):
    stats = train_one_epoch(step, loader, epoch, *args, **kwargs)
    model = step.model
    student = model.module.student if hasattr(model, 'module') else model.student
    torch.save(student.state_dict(), os.path.join(output_dir, f'rank{rank}_epoch{epoch}.pt'))
    return stats


engine_finetune.train_one_epoch = recording_train_one_epoch

if os.environ.get('NAN_ON_RANK') == str(rank):
    forward, calls = TransferCriterion.forward, [0]

    def nan_after_three(self, outputs, targets):
        loss, terms = forward(self, outputs, targets)
        calls[0] += 1
        if calls[0] > 3:
            loss = loss * float('nan')
            terms = {**terms, 'loss': loss}
        return loss, terms

    TransferCriterion.forward = nan_after_three

main_finetune.run(argv)
