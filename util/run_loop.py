"""The run skeleton every training entry point shares (main_finetune.py's Trainer, main_pretrain.py's
Pretraining): what a run is in its output folder (a fresh run, the continuation of the folder's run, a refusal,
or a finished run with nothing to do), then the loop over epochs with its checkpoints, stops, resume, log.txt
and TensorBoard.
"""
from __future__ import annotations

import datetime
import os

from util.checkpoint import describe_position, end_of_epoch_stats, next_position, read_position, saved_position
from util.distributed import log
from util.errors import UserError
from util.output import CHECKPOINT, NUMBERED, logged_epochs, run_files, same_path


# ---- what the run is in its folder, decided at start --------------------------------------------------------
def describe_run(output_dir: str) -> str:
    """What the run in ``output_dir`` left: its latest checkpoint's position and when it was written."""
    files = run_files(output_dir)
    latest = os.path.join(output_dir, CHECKPOINT)
    what = ', '.join(files[:6]) + (f' and {len(files) - 6} more' if len(files) > 6 else '')
    if os.path.isfile(latest):
        when = datetime.datetime.fromtimestamp(os.path.getmtime(latest)).isoformat(sep=' ', timespec='minutes')
        try:
            position = read_position(latest)
            where = 'weights only, no training position' if position is None else describe_position(position)
        except Exception:  # any unreadable file: its position is unknown, its presence is what matters
            where = 'unreadable'
        return f"{what}; checkpoint.pth: {where}, written {when}"
    return what


def check_run_folder(args, resume_from: str | None) -> None:
    """Decide what this run is in --output_dir: a fresh run (the folder holds no run), the continuation of the
    run there (``resume_from`` is one of the folder's own checkpoints), or a refusal that names what is there
    and the two ways on. Evaluation writes only eval_results.json and is never refused."""
    out = args.output_dir
    if args.eval or not out:
        return
    present = run_files(out)
    if not present:
        return
    if resume_from and os.path.realpath(os.path.dirname(os.path.abspath(resume_from))) == os.path.realpath(out):
        check_not_a_fork(out, resume_from)
        return
    here = describe_run(out)
    if args.resume == 'allow':  # no checkpoint.pth, but other files of a run
        numbered = sorted((int(NUMBERED.fullmatch(f).group(1)), f) for f in present if NUMBERED.fullmatch(f))
        hint = (f"continue from its last numbered checkpoint with --resume {os.path.join(out, numbered[-1][1])}"
                if numbered else "continue it from one of its checkpoints with --resume PATH")
        raise UserError(f"--resume allow: --output_dir {out!r} holds a run without checkpoint.pth ({here}); a "
                        f"fresh run would replace its files. {hint[0].upper() + hint[1:]}, or give this run "
                        "another --output_dir.")
    source = (f"--resume {args.resume!r} continues a run from another folder, but " if args.resume else '')
    raise UserError(f"{source}--output_dir {out!r} holds a run ({here}), whose files this run would replace. "
                    "Continue that run with --resume allow, or give this run another --output_dir.")


def check_not_a_fork(output_dir: str, resume_from: str) -> None:
    """Resuming an older checkpoint of the folder (e.g. checkpoint-1.pth) where the folder's checkpoint.pth is
    further on would replace the later epochs' checkpoints and log lines: refused before anything is replaced,
    naming the way to keep them (another --output_dir) and the way to go back deliberately."""
    latest = os.path.join(output_dir, CHECKPOINT)
    if not os.path.isfile(latest) or same_path(latest, resume_from):
        return
    try:
        later, earlier = read_position(latest), read_position(resume_from)
    except Exception:  # an unreadable checkpoint.pth: the numbered one is the way on (see intact_neighbour)
        return
    if later is None or earlier is None:
        return
    if next_position(later) <= next_position(earlier):
        return

    raise UserError(f"--resume {resume_from!r} ({describe_position(earlier)}) is an earlier checkpoint of the run in "
                    f"--output_dir {output_dir!r}, whose checkpoint.pth is further on ({describe_position(later)}): "
                    "continuing from it here would replace that run's later checkpoints and log.txt lines. To branch "
                    "off it and keep the run, give this run another --output_dir (the checkpoint is read from where it "
                    "is); to continue the run itself use --resume allow; to take the run back to it, move "
                    "checkpoint.pth and the later numbered checkpoints out of the folder first.")


def epoch_end_missing(ckpt: dict | None, ckpt_path: str | None, output_dir: str) -> bool:
    """Whether the run folder's own end-of-epoch checkpoint lacks its epoch's evaluation and log.txt line (a stop
    or a kill between the two): the resumed run writes them first."""
    return (end_of_epoch_stats(ckpt) is not None and bool(output_dir) and os.path.isdir(output_dir)
            and os.path.samefile(os.path.dirname(os.path.abspath(ckpt_path)), output_dir)
            and saved_position(ckpt)[0] not in logged_epochs(output_dir))


def finished(ckpt: dict | None, ckpt_path: str | None, epochs: int | None, output_dir: str) -> bool:
    """Whether the resumed run has trained all ``epochs`` and written their ends (a finished run resumed again,
    e.g. --resume allow in a requeued job, is not an error: it says so)."""
    if ckpt is None or epochs is None or next_position(ckpt)[0] < epochs \
            or epoch_end_missing(ckpt, ckpt_path, output_dir):
        return False
    log(f"nothing to do: {ckpt_path} has finished epoch {next_position(ckpt)[0] - 1}, the last of {epochs} "
        "epochs; to train longer raise --epochs, to evaluate add --eval")
    return True
