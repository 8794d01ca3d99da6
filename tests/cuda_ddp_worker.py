"""torchrun worker of tests/test_cuda.py: one bf16 training step of a distill pair wrapped by
util.distributed.wrap_ddp (NCCL, this rank's GPU) beside the same step of an unwrapped copy, then an AdamW step
through DDP; writes what the test checks to the JSON file named by the first argument."""
import copy
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from models_dual_vit import build_dual_vit  # noqa: E402
from util.distributed import wrap_ddp  # noqa: E402

local_rank = int(os.environ['LOCAL_RANK'])
torch.cuda.set_device(local_rank)
device = torch.device('cuda', local_rank)
dist.init_process_group('nccl')
torch.manual_seed(0)
arch = dict(patch_size=8, embed_dim=128, depth=3, num_heads=2)
model = build_dual_vit('vit_base_patch16_224', mode='distill', drop_path_rate=0.1, num_classes=5, img_size=64,
                       teacher_kwargs=arch, attention_impl='fused').to(device)
plain = copy.deepcopy(model)
ddp = wrap_ddp(model, True, local_rank, str(device))
x = torch.randn(4, 3, 64, 64, device=device)
y = torch.randint(0, 5, (4,), device=device)
masks = model.draw_drop_path_masks(4, device)


def backward(net) -> None:
    net.train()
    with torch.autocast('cuda', dtype=torch.bfloat16):
        logits, aux = net(x, drop_path_masks=masks)
    (F.cross_entropy(logits.float(), y) + 3.0 * aux.float()).backward()


backward(ddp)
backward(plain)
grads = torch.cat([p.grad.flatten() for p in model.student.parameters()])
plain_grads = torch.cat([p.grad.flatten() for p in plain.student.parameters()])
before = [p.detach().clone() for p in model.student.parameters()]
torch.optim.AdamW(model.student.parameters(), lr=1e-3, fused=True).step()
teacher_names = {f'teacher.{n}' for n, _ in model.teacher.named_parameters()}
result = {
    'backend': dist.get_backend(),
    'world_size': dist.get_world_size(),
    'teacher_ignored': teacher_names <= set(ddp.parameters_to_ignore),
    'teacher_grads': sum(p.grad is not None for p in model.teacher.parameters()),
    'grad_rel_diff': ((grads - plain_grads).norm() / plain_grads.norm()).item(),
    'params_changed': any(not torch.equal(a, p) for a, p in zip(before, model.student.parameters())),
    'finite': all(torch.isfinite(p).all().item() for p in model.student.parameters()),
}
if dist.get_rank() == 0:
    with open(sys.argv[1], 'w') as f:
        json.dump(result, f)
dist.destroy_process_group()
