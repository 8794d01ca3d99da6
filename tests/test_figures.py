"""tools/visualize_attention.py's figures: every heat map of a figure on one colour scale, with a colour bar."""
import pytest
import torch
from helpers import TINY_ARCH

from models_vit import create_vit
from tools import visualize_attention


@pytest.fixture
def figures(monkeypatch):
    kept = []
    monkeypatch.setattr(visualize_attention.plt, 'close', kept.append)
    return kept


def heat_maps(fig):
    return [image for ax in fig.axes for image in ax.get_images() if image.get_array().ndim == 2]  # not the RGB input


def check_one_scale(fig, maps):
    images = heat_maps(fig)
    assert len(images) == len(maps)
    low, high = min(float(m.min()) for m in maps), max(float(m.max()) for m in maps)
    assert all(image.get_clim() == pytest.approx((low, high)) for image in images)
    assert any(ax.get_label() == '<colorbar>' for ax in fig.axes)


def test_token_maps_share_one_scale_and_a_colour_bar(figures, tmp_path):
    torch.manual_seed(0)
    sharp = torch.softmax(torch.randn(1, 2, 5, 5) * 4, -1)
    flat = torch.full((1, 2, 5, 5), 0.2) + torch.randn(1, 2, 5, 5) * 1e-3  # near-uniform: must look it
    visualize_attention.plot_token_maps({'teacher': {0: sharp}, 'student': {0: flat}}, 0, 2,
                                        str(tmp_path / 'maps.png'))
    check_one_scale(figures[0], [sharp[0, h] for h in range(2)] + [flat[0, h] for h in range(2)])


def test_class_token_maps_share_one_scale_and_a_colour_bar(figures, tmp_path):
    vit = create_vit('vit_base_patch16_224', num_classes=3, img_size=32, **TINY_ARCH)
    n = vit.patch_embed.num_patches + vit.num_prefix_tokens
    torch.manual_seed(0)
    maps = {name: {layer: torch.softmax(torch.randn(1, 3, n, n) * scale, -1) for layer in (0, 1)}
            for name, scale in (('teacher', 4.0), ('student', 0.01))}
    visualize_attention.plot_cls_attention(torch.rand(3, 32, 32), maps, {'teacher': vit, 'student': vit}, 2,
                                           str(tmp_path / 'cls.png'))
    rows = [maps[name][layer][0, h, 0, 1:] for layer in (0, 1) for name in maps for h in range(2)]
    check_one_scale(figures[0], rows)
