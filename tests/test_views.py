import numpy as np
import pytest
import timm
from PIL import Image

from gendd_pipe import seeds
from gendd_pipe.data.render import render_view
from gendd_pipe.data.views import ViewConfig, eval_view, random_view, sample_views
from tests.helpers import to_tensor

MEAN, STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)


@pytest.mark.parametrize("size", [224, 64])
@pytest.mark.parametrize("name", ["chelsea", "coffee", "astronaut"])
def test_eval_view_matches_timm_eval_transform(photos, name, size):
    image = Image.fromarray(photos[name]).convert("RGB")
    reference = timm.data.create_transform(input_size=(3, size, size), interpolation="bicubic", crop_pct=0.875,
                                           crop_mode="center", mean=MEAN, std=STD)(image)
    view = eval_view(image.width, image.height, (size, size), 0.875, "center")
    ours = to_tensor(render_view(image, view, (size, size), "bicubic"), MEAN, STD)
    # The box is stored as float32 fractions: at most a pixel in a thousand moves by one grey level.
    assert ours.shape == reference.shape
    assert (ours - reference).abs().max() <= 2.5 / 255 * 2
    assert (ours != reference).float().mean() < 1e-3


def test_random_views_depend_only_on_seed_key_and_view():
    cfg = ViewConfig(count=4, hflip=0.5, seed=3)
    a = sample_views("img-1", 300, 200, cfg, (64, 64), 0.875, "center")
    b = sample_views("img-1", 300, 200, cfg, (64, 64), 0.875, "center")
    c = sample_views("img-2", 300, 200, cfg, (64, 64), 0.875, "center")
    assert a.shape == (4, 5) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a[1:], c[1:])
    np.testing.assert_array_equal(a[0], c[0])  # view 0 is the deterministic eval view
    assert len({tuple(v) for v in a}) == 4


def test_random_view_boxes_lie_inside_the_image_and_respect_scale():
    cfg = ViewConfig(scale=(0.25, 0.5), ratio=(0.75, 4 / 3), hflip=0.5)
    boxes = np.stack([random_view(320, 240, cfg, seeds.rng(0, f"k{i}", 1)) for i in range(400)])
    top, left, h, w, flip = boxes.T
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 1 + 1e-6).all() and (left + w <= 1 + 1e-6).all()
    area = h * w
    assert area.min() >= 0.24 and area.max() <= 0.51
    assert 0.4 < flip.mean() < 0.6


def test_render_view_flips_and_resizes():
    image = Image.fromarray(np.arange(64 * 64 * 3, dtype=np.uint8).reshape(64, 64, 3))
    full = np.array([0, 0, 1, 1, 0], np.float32)
    flipped = np.array([0, 0, 1, 1, 1], np.float32)
    a = np.asarray(render_view(image, full, (64, 64), "bilinear"))
    b = np.asarray(render_view(image, flipped, (64, 64), "bilinear"))
    np.testing.assert_array_equal(a, np.asarray(image))
    np.testing.assert_array_equal(b, a[:, ::-1])
    assert render_view(image, np.array([0.5, 0, 0.5, 0.25, 0], np.float32), (10, 20), "bicubic").size == (20, 10)
