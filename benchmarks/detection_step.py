"""A detection training step at detection resolution: the largest tensor it creates (is there an N x N map?)
and its time, next to a classification step.

    python benchmarks/detection_step.py [--size 1024] [--model vit_base_patch16_224] [--repeats 2] [--no_explicit]

Memory: every tensor each operator of one training step creates (forward, backward, the optimizer step) is
seen by a torch dispatch mode, which records the largest and counts the N x N maps: those whose two
trailing dimensions are token counts, N patches (4,096 at 1,024 px with 16 px patches) or N + 1 with the class
token. With the fused attention the distill step creates none; the explicit one, for contrast, creates them in
the global blocks.

Time: the median of ``--repeats`` timed steps (after one untimed) of the detector with batch 1 at ``--size``
(modes none and distill, the latter fused and explicit), and of main_finetune's classification step of the same
ViT at 224 px (distill, batch 1). One process, on this machine's CPU or GPU (``--device``).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402  (pinned: tests/test_private_apis.py)

import main_detection  # noqa: E402
from models_dual_vit import build_dual_vit  # noqa: E402
from util.config import Config  # noqa: E402


class LargestTensors(TorchDispatchMode):
    """Records the largest tensor any operator returns, and how many are token x token maps: both trailing
    dimensions one of ``tokens`` (the patch count, with and without the class token)."""

    def __init__(self, tokens: set[int]) -> None:
        super().__init__()
        self.tokens, self.largest, self.square, self.largest_op = tokens, 0, 0, ''

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                size = t.numel() * t.element_size()
                if size > self.largest:
                    self.largest, self.largest_op = size, f"{func.__name__} {tuple(t.shape)}"
                if t.dim() >= 2 and t.shape[-1] in self.tokens and t.shape[-2] in self.tokens:
                    self.square += 1
        return out


def detection_config(size: int, model: str, mode: str, impl: str, device: str) -> Config:
    parser = main_detection.get_args_parser()
    args = parser.parse_args(['--mode', mode, '--model', model, '--input_size', str(size), '--attention_impl', impl,
                              '--device', device])
    return Config.of(args, model_kwargs={}, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), amp='none')


def detection_step(size: int, model_name: str, mode: str, impl: str, device: torch.device):
    cfg = detection_config(size, model_name, mode, impl, str(device))
    model = main_detection.build_model(cfg, 80).to(device).train()
    optimizer = torch.optim.AdamW(main_detection.param_groups(model, cfg), lr=1e-4)
    criterion = main_detection.DetectionLoss(1.0)
    image = torch.rand(1, 3, size, size, device=device)
    masks = torch.zeros(3, size, size, dtype=torch.uint8, device=device)
    boxes = torch.tensor([[100., 120., 400., 500.], [500., 300., 900., 700.], [50., 600., 300., 1000.]],
                         device=device) * size / 1024
    for m, (x0, y0, x1, y1) in zip(masks, boxes.int().tolist()):
        m[y0:y1, x0:x1] = 1
    targets = [{'boxes': boxes, 'labels': torch.tensor([1, 5, 9], device=device), 'masks': masks}]

    def step() -> None:
        loss, _ = criterion(model(image, targets), targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step, model


def classification_step(model_name: str, device: torch.device):
    model = build_dual_vit(model_name, mode='distill', num_classes=1000, img_size=224, device=device).to(device).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    image, label = torch.rand(1, 3, 224, 224, device=device), torch.tensor([3], device=device)

    def step() -> None:
        logits, transfer = model(image)
        (torch.nn.functional.cross_entropy(logits, label) + transfer).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def timed(step, repeats: int, device: torch.device) -> float:
    def sync() -> None:
        if device.type == 'cuda':
            torch.cuda.synchronize()
    step()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None) -> list[str]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--size', default=1024, type=int)
    p.add_argument('--model', default='vit_base_patch16_224')
    p.add_argument('--repeats', default=2, type=int)
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--no_explicit', action='store_true', help='skip the explicit attention (its N x N maps)')
    args = p.parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)
    lines = [f"# detection step, {args.model} at {args.size} px, batch 1, {device.type}"
             f" ({torch.get_num_threads()} threads), torch {torch.__version__}", '',
             '| run | N (patches) | largest tensor | N x N tensors | step time (s) |',
             '|---|---|---|---|---|']
    runs = [('none', 'fused'), ('distill', 'fused')] + ([] if args.no_explicit else [('distill', 'explicit')])
    for mode, impl in runs:
        step, model = detection_step(args.size, args.model, mode, impl, device)
        n = model.student.patch_embed.num_patches
        with LargestTensors({n, n + 1}) as seen:
            step()
        seconds = timed(step, args.repeats, device)
        lines.append(f"| detection, mode {mode}, {impl} | {n} | {seen.largest / 2 ** 20:.0f} MiB ({seen.largest_op}) "
                     f"| {seen.square} | {seconds:.2f} |")
        print(lines[-1], flush=True)
        del step, model
    seconds = timed(classification_step(args.model, device), args.repeats, device)
    lines.append(f"| classification (main_finetune.py), distill, 224 px | 196 | | | {seconds:.2f} |")
    print('\n'.join(lines))
    return lines


if __name__ == '__main__':
    main()
