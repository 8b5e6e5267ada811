"""Training an inpainting model: the 9-channel UNet made from a text-to-image one, the random masks, the
masked image's latents, and train_ldm.py --inpainting end to end."""

import json

import pytest
import torch

from latentdiff import LatentDiffInpaintPipeline, unet_from_preset, vae_from_preset
from latentdiff.training.inpainting import (
    inpainting_example,
    inpainting_unet,
    masked_image_conditioning,
    random_masks,
)


def test_the_inpainting_unet_starts_as_the_text_to_image_one():
    torch.manual_seed(0)
    unet = unet_from_preset("tiny").eval()
    x, t, states = torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), torch.randn(2, 5, 32)
    before = unet(x, t, encoder_hidden_states=states).sample
    nine = inpainting_unet(unet)
    assert nine.config.in_channels == 9 and nine.conv_in.in_channels == 9
    after = nine(torch.cat([x, torch.randn(2, 5, 8, 8)], dim=1), t, encoder_hidden_states=states).sample
    torch.testing.assert_close(after, before)  # the new channels start at zero
    assert inpainting_unet(nine) is nine
    with pytest.raises(ValueError, match="takes 7 channels: neither a text-to-image UNet \\(4\\) nor an inpainting one \\(9\\)"):
        inpainting_unet(unet_from_preset("tiny", in_channels=7))


def test_random_masks_cover_the_whole_image_a_quarter_of_the_time_else_rectangles():
    generator = torch.Generator().manual_seed(0)
    masks = random_masks(400, 32, 24, generator)
    assert masks.shape == (400, 1, 32, 24) and set(masks.unique().tolist()) <= {0.0, 1.0}
    full = (masks.flatten(1).mean(1) == 1).float().mean().item()
    assert 0.18 < full < 0.32
    partial = masks[masks.flatten(1).mean(1) < 1]
    assert (partial.flatten(1).sum(1) > 0).all()  # every other mask has at least one rectangle
    torch.testing.assert_close(random_masks(400, 32, 24, torch.Generator().manual_seed(0)), masks)


def test_masked_image_conditioning_is_the_mask_and_the_masked_images_latents():
    torch.manual_seed(0)
    vae = vae_from_preset("tiny").eval()
    pixels = torch.rand(2, 3, 16, 16) * 2 - 1
    masks = torch.zeros(2, 1, 16, 16)
    masks[:, :, :8] = 1  # the top half is filled in
    extra = masked_image_conditioning(pixels, vae, torch.Generator().manual_seed(1), (8, 8), masks=masks)
    assert extra.shape == (2, 5, 8, 8)
    assert extra[:, 0, :4].eq(1).all() and extra[:, 0, 4:].eq(0).all()
    kept = pixels * (masks < 0.5)
    expected = vae.encode(kept).latent_dist.sample(torch.Generator().manual_seed(1)) * vae.config.scaling_factor
    torch.testing.assert_close(extra[:, 1:], expected)


def test_train_ldm_inpainting_trains_a_nine_channel_model_from_a_text_to_image_one(tmp_path):
    """From a text-to-image pipeline: the saved UNet takes 9 channels, its latent channels' input weights are
    trained from the original's, and --cache_latents (which cannot hold per-step masked images) is refused."""
    from diffusers import UNet2DConditionModel
    from scripts import load_script, run_script

    from latentdiff import pipeline_from_preset

    train_ldm = load_script("train_ldm")
    pipeline_from_preset("tiny", seed=0).save_pretrained(tmp_path / "base")
    flags = ["--pretrained_model_name_or_path", tmp_path / "base", "--dataset_name", "shapes", "--resolution", 32,
             "--max_train_samples", 8, "--data_cache_dir", tmp_path / "cache", "--train_batch_size", 2,
             "--report_to", "none", "--max_train_steps", 2, "--inpainting", "--validation_prompts", "a red circle",
             "--num_validation_images", 2, "--validation_inference_steps", 2]  # fmt: skip
    with pytest.raises(ValueError, match="--inpainting encodes each step's masked images"):
        run_script(train_ldm, [*flags, "--output_dir", tmp_path / "cached", "--cache_latents"])
    pipeline_dir = run_script(train_ldm, [*flags, "--output_dir", tmp_path / "run"])
    unet = UNet2DConditionModel.from_pretrained(pipeline_dir / "unet")
    base = UNet2DConditionModel.from_pretrained(tmp_path / "base" / "unet")
    assert unet.config.in_channels == 9 and unet.conv_in.weight.shape[1] == 9
    assert not torch.equal(unet.conv_in.weight[:, :4], base.conv_in.weight)  # trained
    assert unet.conv_in.weight[:, 4:].abs().max() > 0  # the new channels learned something
    assert (tmp_path / "run" / "validation" / "step-000002.png").is_file()  # inpainting the center square
    assert json.loads((pipeline_dir / "model_index.json").read_text())["_class_name"] == "StableDiffusionInpaintPipeline"
    pipe = LatentDiffInpaintPipeline.from_pretrained(pipeline_dir)
    example = inpainting_example(torch.rand(3, 32, 32) * 2 - 1)
    assert pipe("a red circle", **example, num_inference_steps=2, output_type="np").images.shape == (1, 32, 32, 3)
