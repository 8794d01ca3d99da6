"""Launch main_detection.py on SLURM through submitit: one task per GPU, preemption-safe, self-requeueing, as
submitit_finetune.py launches main_finetune.py (the same job flags and behaviour; docs/TRAINING.md).

    python submitit_detection.py --job_dir $JOB_DIR --nodes 8 --ngpus 8 --batch_size 1 \\
        --mode distill --finetune mae_pretrain_vit_base.pth --data_path $COCO --resume allow

Every flag of main_detection.py is accepted, plus the job's own (--job_dir, --nodes, --ngpus, ...).
"""
from __future__ import annotations

import main_detection
import submitit_finetune
from util.errors import run_cli


def main(argv=None):
    return submitit_finetune.main(argv, entry=main_detection, script='submitit_detection.py', description=__doc__)


if __name__ == '__main__':
    run_cli(main)
