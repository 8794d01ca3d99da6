import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# A ViT small enough for CPU tests: 32x32 input, patch 8 -> 16 patches + class token, 3 heads.
TINY = dict(img_size=32, patch_size=8, embed_dim=48, depth=4, num_heads=3)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
