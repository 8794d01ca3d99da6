"""Where a run's scalars go: TensorBoard (in --log_dir) and, with --log_wandb, Weights & Biases; and the figure
of the run's curves in its folder.

``Tracker`` takes the points the loop and the training step write (``add_scalar``: a name, a value and the
position in thousandths of an epoch) and gives each to every backend; at the start it records the run's
configuration (TensorBoard: as text; W&B: as the run's config, with the run record), at the end its
hyper-parameters with the best top-1. This module imports wandb only when --log_wandb is given (timm's
``timm.utils`` imports it on its own wherever it is installed), and starts no W&B run without it. A resumed
run continues the same W&B run (its id is kept in the run folder). Rank 0 only.

``write_curves`` draws log.txt (the logged truth, one line per epoch) as ``curves.png``: the loss terms, the lr,
and top-1 of the raw and EMA weights where present; rewritten atomically after each epoch's end.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import uuid
from typing import Any, Optional

from util.errors import UserError

CURVES = 'curves.png'
WANDB_ID = 'wandb_id.txt'


def add_tracking_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group('tracking')
    g.add_argument('--log_wandb', action='store_true',
                   help='also log the scalars, the configuration and the run record to Weights & Biases (needs '
                        'the wandb package; WANDB_MODE=offline writes the run under --output_dir/wandb to sync later)')
    g.add_argument('--wandb_project', default='attention-transfer', help='the W&B project of --log_wandb')
    g.add_argument('--wandb_name', default=None, help='the W&B run name (default: the --output_dir folder name)')


class Tracker:
    """The run's scalar sinks behind SummaryWriter's own calls (add_scalar, flush, close)."""

    def __init__(self, tensorboard: Any = None, wandb_run: Any = None) -> None:
        self.tensorboard, self.wandb_run = tensorboard, wandb_run

    def add_scalar(self, name: str, value: float, x: int) -> None:
        if self.tensorboard is not None:
            self.tensorboard.add_scalar(name, value, x)
        if self.wandb_run is not None:
            self.wandb_run.log({name: value, 'epoch': x / 1000})

    def add_config(self, config: dict, record: list) -> None:
        """The configuration as TensorBoard text and as the W&B run's config (with the run record)."""
        import yaml

        if self.tensorboard is not None:
            text = yaml.safe_dump(config, sort_keys=True, default_flow_style=None, width=120)
            self.tensorboard.add_text('config', '```\n' + text + '\n```', 0)
        if self.wandb_run is not None:
            self.wandb_run.config.update({**config, 'run_record': record}, allow_val_change=True)

    def add_hparams(self, config: dict, best: dict) -> None:
        """TensorBoard's hyper-parameter table: the scalar flags beside the best accuracies."""
        if self.tensorboard is None or not best:
            return
        hparams = {k: v for k, v in config.items() if isinstance(v, (bool, int, float, str)) and
                   not (isinstance(v, float) and not math.isfinite(v))}
        from torch.utils.tensorboard.summary import hparams as hparams_summaries

        metrics = {f'hparams/{k}': v for k, v in best.items()}
        # into the run's own events file (SummaryWriter.add_hparams would open a subfolder of the run folder)
        for summary in hparams_summaries(hparams, metrics):
            self.tensorboard.file_writer.add_summary(summary)
        for name, value in metrics.items():
            self.tensorboard.add_scalar(name, value)

    def flush(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.flush()

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None


def check_wandb(log_wandb: bool) -> None:
    """--log_wandb needs wandb: refused at start (before any folder is made) when it cannot be imported."""
    if log_wandb:
        try:
            import wandb  # noqa: F401
        except ImportError as e:
            raise UserError(f"--log_wandb: the wandb package cannot be imported ({e}): pip install wandb, or drop "
                            "--log_wandb") from e


def open_wandb(cfg: Any) -> Any:
    """The W&B run of --log_wandb (None without it): the run folder's own, continued on resume."""
    if not cfg.log_wandb or not cfg.output_dir:
        return None
    import wandb

    id_path = os.path.join(cfg.output_dir, WANDB_ID)
    run_id = open(id_path).read().strip() if os.path.isfile(id_path) else uuid.uuid4().hex[:8]
    name = cfg.wandb_name or os.path.basename(os.path.abspath(cfg.output_dir))
    run = wandb.init(project=cfg.wandb_project, name=name, id=run_id, resume='allow', dir=cfg.output_dir)
    with open(id_path, 'w') as f:
        f.write(run_id)
    return run


def write_curves(output_dir: str) -> Optional[str]:
    """curves.png of log.txt's epochs (None where there is no log.txt line yet)."""
    from util.output import LOG, atomic_write_bytes

    path = os.path.join(output_dir, LOG)
    if not output_dir or not os.path.isfile(path):
        return None
    with open(path) as f:
        lines = [json.loads(line) for line in f if line.strip()]
    if not lines:
        return None
    import io

    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    epochs = [line['epoch'] for line in lines]
    losses = sorted({k for line in lines for k in line if k.startswith('train_loss')})
    accuracies = [k for k in ('test_acc1', 'ema_test_acc1') if any(k in line for line in lines)]
    panels = [('loss', losses), ('lr', ['train_lr'] if any('train_lr' in line for line in lines) else []),
              ('top-1 (%)', accuracies)]
    panels = [(title, keys) for title, keys in panels if keys]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.5), squeeze=False)
    for ax, (title, keys) in zip(axes[0], panels):
        for key in keys:
            points = [(line['epoch'], line[key]) for line in lines if key in line]
            ax.plot([p[0] for p in points], [p[1] for p in points], marker='o', markersize=3,
                    label=key.removeprefix('train_'))
        ax.set_title(title)
        ax.set_xlabel('epoch')
        ax.legend(fontsize=8)
    fig.suptitle(f"{os.path.basename(os.path.abspath(output_dir))}: epochs {min(epochs)}-{max(epochs)}")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format='png', dpi=100)
    plt.close(fig)
    target = os.path.join(output_dir, CURVES)
    atomic_write_bytes(buffer.getvalue(), target)
    return target
