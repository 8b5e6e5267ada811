"""The data flags every training script shares, under diffusers' names."""

from __future__ import annotations

import argparse

from latentdiff.data.captions import CaptionOptions
from latentdiff.data.files import default_cache_dir

BUILTIN_DATASETS = ("shapes", "emoji", "emojione", "emoji+emojione")
# resolution when --resolution is not given: the built-ins' native sizes, diffusers' 512 otherwise
DEFAULT_RESOLUTION = {"shapes": 32, "emoji": 64, "emojione": 64, "emoji+emojione": 64}
USER_DEFAULT_RESOLUTION = 512


def add_data_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Where the training images come from (a dataset or a folder), and how they are read (`add_image_args`)."""
    group = parser.add_argument_group("data")
    group.add_argument(
        "--dataset_name", type=str, default=None,
        help="a built-in dataset (shapes; emoji, emojione or emoji+emojione: Noto's, EmojiOne's or both "
             "styles of emoji), a local folder or parquet/arrow file, or a name "
             "datasets.load_dataset accepts (needs network unless already cached). A local folder "
             "named like a built-in must be given as a path: ./shapes",
    )
    group.add_argument("--dataset_config_name", type=str, default=None,
                       help="the configuration of a --dataset_name from the Hub")
    group.add_argument(
        "--train_data_dir", type=str, default=None,
        help="a local folder: images + metadata.jsonl (imagefolder), images + same-named .txt "
             "captions, or a datasets.save_to_disk folder",
    )
    group.add_argument("--image_column", type=str, default="image", help="the column holding the images")
    group.add_argument(
        "--caption_column", type=str, default="text",
        help="the column holding the captions (a caption or a list of them); '' for images without "
             "captions (VAE training), whose items then have the text ''",
    )
    group.add_argument("--max_train_samples", type=int, default=None,
                       help="train on a fixed random subset of this many items")
    group.add_argument("--min_image_size", type=int, default=0,
                       help="skip images whose shorter side is below this many pixels")
    add_caption_args(parser)
    return add_image_args(parser)


def add_caption_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Captions as comma-separated tag lists, under kohya-ss sd-scripts' names (`latentdiff.data.captions`)."""
    group = parser.add_argument_group("captions")
    group.add_argument("--caption_extension", type=str, default=None,
                       help="the extension of the caption file beside each image (photo.png + photo.txt); "
                            "default: .txt, else .caption")
    group.add_argument("--shuffle_caption", action="store_true",
                       help="shuffle the comma-separated tags of each training caption, anew every epoch")
    group.add_argument("--keep_tokens", type=int, default=0,
                       help="keep the first N tags in place: never shuffled nor dropped")
    group.add_argument(
        "--keep_tokens_separator", type=str, default="",
        help="a marker in the caption (e.g. '|||'): tags before it are kept, and tags after a second one are a "
             "kept suffix; overrides --keep_tokens where a caption has it",
    )
    group.add_argument("--caption_tag_dropout_rate", type=float, default=0.0,
                       help="leave out each tag beyond the kept ones with this probability")
    return parser


def caption_options(args: argparse.Namespace) -> CaptionOptions:
    """The caption flags of ``args`` (defaults where a script has none); raises for values out of range."""
    extension = getattr(args, "caption_extension", None)
    if extension is not None and not extension.strip(". "):
        raise ValueError(f"--caption_extension must name an extension (e.g. .txt, .caption), got {extension!r}")
    return CaptionOptions(
        shuffle=bool(getattr(args, "shuffle_caption", False)),
        keep_tokens=getattr(args, "keep_tokens", 0) or 0,
        tag_dropout=getattr(args, "caption_tag_dropout_rate", 0.0) or 0.0,
        keep_tokens_separator=getattr(args, "keep_tokens_separator", "") or "",
    )


def add_image_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """How images become training inputs (size, crop, flip), where caches live, how many loader processes."""
    group = parser.add_argument_group("images")
    group.add_argument(
        "--resolution", type=int, default=None,
        help=f"side of the square training images (default: shapes {DEFAULT_RESOLUTION['shapes']}, "
             f"emoji and emojione {DEFAULT_RESOLUTION['emoji']}, a pretrained pipeline's own size, else {USER_DEFAULT_RESOLUTION})",
    )
    group.add_argument("--random_crop", action="store_true",
                       help="crop the square at a random place (default: the center square)")
    group.add_argument(
        "--random_flip", action="store_true",
        help="mirror half the images at random (off by default: it swaps 'left' and 'right' in what a "
             "caption describes)",
    )
    group.add_argument(
        "--data_cache_dir", type=str, default=None,
        help=f"where built-in datasets are rendered and latent caches are kept (default: {default_cache_dir()}, "
             "following $XDG_CACHE_HOME)",
    )
    group.add_argument("--dataloader_num_workers", type=int, default=0,
                       help="data loading processes (0: load in the main process)")
    group.add_argument("--shuffle_buffer", type=int, default=None,
                       help="tar shards (latentdiff prepare): samples each data loading process shuffles among as it "
                            "streams (default 1000, webdataset's; that many encoded images held in memory each)")
    buckets = parser.add_argument_group("aspect-ratio buckets (kohya-ss sd-scripts' names)")
    buckets.add_argument(
        "--enable_bucket", action="store_true",
        help="train each image at the size of about --resolution^2 pixels nearest its aspect (a bucket), cropping "
             "only what sticks out, instead of a center square; a batch holds one bucket",
    )
    buckets.add_argument("--min_bucket_reso", type=int, default=256, help="the shortest side a bucket may have")
    buckets.add_argument("--max_bucket_reso", type=int, default=1024, help="the longest side a bucket may have")
    buckets.add_argument(
        "--bucket_reso_steps", type=int, default=64,
        help="bucket sides are multiples of this; it must be a multiple of what the models need (the VAE's "
             "downsampling x the UNet's: 64 for SD's)",
    )
    return parser


def default_dataset(args: argparse.Namespace, name: str) -> argparse.Namespace:
    """Train on the built-in ``name`` when neither ``--dataset_name`` nor ``--train_data_dir`` was given.

    A parser default would read as if the user had typed ``--dataset_name``, and a lone
    ``--train_data_dir`` would then be refused as a second source.
    """
    if name not in BUILTIN_DATASETS:
        raise ValueError(f"the default dataset must be one of {BUILTIN_DATASETS}, got {name!r}")
    if not getattr(args, "dataset_name", None) and not getattr(args, "train_data_dir", None):
        args.dataset_name = name
    return args


def resolution_of(args: argparse.Namespace, native: int | None = None) -> int:
    """``--resolution``; else a built-in dataset's size; else ``native`` (a pretrained model's own); else 512."""
    if getattr(args, "resolution", None):
        return args.resolution
    return DEFAULT_RESOLUTION.get(getattr(args, "dataset_name", None), native or USER_DEFAULT_RESOLUTION)
