"""Every image mode becomes RGB on white, upright, resized, cropped and scaled to [-1, 1]."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from latentdiff.data.transforms import (
    exif_upright,
    open_image,
    preprocess,
    resize_and_crop,
    to_pil,
    to_rgb,
    to_tensor,
)


def rgb_of(image):
    return np.asarray(to_rgb(image))


def test_alpha_is_composited_on_white():
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    rgba.putpixel((0, 0), (255, 0, 0, 255))
    rgba.putpixel((1, 0), (0, 0, 0, 128))
    out = rgb_of(rgba)
    assert out[0, 0].tolist() == [255, 0, 0]
    assert out[3, 3].tolist() == [255, 255, 255]  # fully transparent: white, not red or black
    assert 120 <= out[0, 1, 0] <= 135  # half-transparent black over white: mid grey

    la = Image.new("LA", (2, 2), (0, 0))
    la.putpixel((0, 0), (0, 255))
    out = rgb_of(la)
    assert out[0, 0].tolist() == [0, 0, 0] and out[1, 1].tolist() == [255, 255, 255]


def test_palette_grey_and_cmyk():
    palette = Image.new("RGB", (2, 2), (0, 0, 255)).convert("P")
    assert rgb_of(palette)[0, 0].tolist() == [0, 0, 255]

    transparent = Image.new("P", (2, 2), 1)
    transparent.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    transparent.info["transparency"] = 1
    assert rgb_of(transparent)[0, 0].tolist() == [255, 255, 255]

    assert rgb_of(Image.new("L", (2, 2), 100))[0, 0].tolist() == [100, 100, 100]
    assert rgb_of(Image.new("1", (2, 2), 1))[0, 0].tolist() == [255, 255, 255]
    cmyk = rgb_of(Image.new("CMYK", (2, 2), (0, 255, 255, 0)))
    assert cmyk[0, 0].tolist() == [255, 0, 0]


def test_sixteen_bit_grey_is_scaled_not_clipped(tmp_path):
    array = np.full((4, 4), 32768, dtype=np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(array).save(path)
    image = open_image(path)
    assert image.mode.startswith("I")
    assert abs(int(rgb_of(image)[0, 0, 0]) - 128) <= 1  # 32768 / 65535 of full scale, not clipped to 255
    assert rgb_of(Image.fromarray(np.full((2, 2), 0.5, dtype=np.float32), "F"))[0, 0, 0] == 128


def test_exif_orientation_is_applied(tmp_path):
    image = Image.new("RGB", (40, 20), "white")
    image.paste((255, 0, 0), (15, 0, 25, 20))  # a vertical red band in the middle of a landscape image
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    path = tmp_path / "rotated.jpg"
    image.save(path, exif=exif, quality=95)
    assert exif_upright(open_image(path)).size == (20, 40)
    pixels = np.asarray(to_pil(preprocess(open_image(path), 20)))
    # upright, the band is horizontal: the crop's middle row is red all across, its corner white
    assert (pixels[10, :, 0] > 200).all() and (pixels[10, :, 1] < 60).all()
    assert pixels[1, 1].min() > 200


def test_resize_short_side_then_center_crop():
    image = Image.new("RGB", (100, 50), "white")
    image.paste((0, 0, 0), (45, 0, 55, 50))  # a black bar in the middle
    out = resize_and_crop(image, 16)
    assert out.size == (16, 16)
    assert np.asarray(out)[8, 8].max() < 50  # the bar stays centered
    tensor = to_tensor(out)
    assert tensor.dtype == torch.float32 and tensor.min() >= -1 and tensor.max() <= 1


def test_random_crop_varies_and_follows_the_generator():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 128, 3), dtype=np.uint8))
    crops = {resize_and_crop(image, 32, True, torch.Generator().manual_seed(s)).tobytes() for s in range(8)}
    assert len(crops) > 1
    a = resize_and_crop(image, 32, True, torch.Generator().manual_seed(3))
    b = resize_and_crop(image, 32, True, torch.Generator().manual_seed(3))
    assert a.tobytes() == b.tobytes()


def test_flip_mirrors_and_scaling_round_trips():
    image = Image.new("RGB", (8, 8), "white")
    image.putpixel((0, 0), (0, 0, 0))
    flipped = preprocess(image, 8, flip=True)
    assert flipped[:, 0, 7].tolist() == [-1, -1, -1] and flipped[:, 0, 0].tolist() == [1, 1, 1]
    assert to_pil(preprocess(image, 8)).tobytes() == image.tobytes()


def test_open_image_reads_bytes_and_dataset_cells():
    buffer = io.BytesIO()
    Image.new("RGB", (3, 3), "red").save(buffer, "PNG")
    assert open_image(buffer.getvalue()).size == (3, 3)
    assert open_image({"bytes": buffer.getvalue(), "path": None}).size == (3, 3)
    with pytest.raises(TypeError):
        open_image(3.5)
