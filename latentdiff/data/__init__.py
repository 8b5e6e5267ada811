"""Training data: loaders for user data, the built-in shapes and emoji datasets, latent caching.

    parser = add_data_args(argparse.ArgumentParser())
    args = parser.parse_args()
    train = build_dataset(args, "train")        # items {"pixel_values": (3, R, R), "text": str}
    loader = build_dataloader(train, batch_size=32, seed=args.seed, num_workers=args.dataloader_num_workers)
    cached = cache_latents(train, vae, cache_dir=args.data_cache_dir, accelerator=accelerator)
"""

from latentdiff.data.args import add_data_args
from latentdiff.data.cache import LatentCache, cache_latents, encode_text, sample_latent
from latentdiff.data.dataset import CaptionedImageDataset, ImageCaptionDataset
from latentdiff.data.emoji import EmojiDataset
from latentdiff.data.files import default_cache_dir
from latentdiff.data.loaders import build_dataloader, build_dataset, collate
from latentdiff.data.shapes import ShapesDataset, analyze

__all__ = [
    "CaptionedImageDataset",
    "EmojiDataset",
    "ImageCaptionDataset",
    "LatentCache",
    "ShapesDataset",
    "add_data_args",
    "analyze",
    "build_dataloader",
    "build_dataset",
    "cache_latents",
    "collate",
    "default_cache_dir",
    "encode_text",
    "sample_latent",
]
