"""The input geometry: padded squares, crop fractions, grids mapped back to pixels."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from clipground.backbone.geometry import InputGeometry, crop_fraction, pad_to_square, square_geometry


def test_geometry_round_trip_and_crop_fraction() -> None:
    img = Image.new("RGB", (60, 30), (255, 0, 0))
    sq, geom = pad_to_square(img, (0.0, 0.0, 0.0))
    assert sq.size == (60, 60) and sq.getpixel((10, 40)) == (0, 0, 0) and sq.getpixel((10, 10)) == (255, 0, 0)
    box = torch.tensor([[6.0, 3.0, 30.0, 27.0]])
    assert torch.allclose(geom.to_pixels(geom.to_normalized(box)), box)
    assert torch.allclose(geom.to_normalized(box), box / 60)
    # A processor that resizes to 256 and crops 224 only sees the centre 7/8 of the square.
    g2 = square_geometry(60, 30, fraction=224 / 256)
    assert g2.to_pixels(torch.tensor([[0.0, 0.0, 1.0, 1.0]]), clip=False).tolist()[0] == pytest.approx(
        [60 / 16, 60 / 16, 60 - 60 / 16, 60 - 60 / 16])

    class P:  # minimal processor stand-in
        do_center_crop, crop_size, size = True, {"height": 224}, {"shortest_edge": 256}

    assert crop_fraction(P()) == pytest.approx(224 / 256)
    # grid_to_image samples the model grid at each pixel's position in the padded square.
    grid = torch.zeros(2, 2)
    grid[1, 0] = 1.0  # bottom-left quarter of the square = padding for a 60x30 image
    heat = InputGeometry(60.0, 60.0, 0.0, 0.0, 60, 30).grid_to_image(grid)
    assert heat.shape == (30, 60) and float(heat.max()) < 0.5
