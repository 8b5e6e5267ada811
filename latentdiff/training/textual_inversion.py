"""Textual inversion (Gal et al. 2022): a new word for a concept, learned as its input embedding alone.

The placeholder becomes ``num_vectors`` new tokens (``<tok>``, ``<tok>_1``, ...), their embeddings start
at the initializer token's, and only they train: the UNet, the VAE and every other weight of the text
encoder stay frozen. The new rows are a parameter of their own beside the frozen table
(``PlaceholderEmbedding``), so the other rows stay bit for bit what they were by construction, with no
copying back after each step; checkpoints hold the new rows only. Captions are the paper's templates
("a photo of a {}" for an object, "a painting in the style of {}" for a style) around the placeholder.

    task = TextualInversion(accelerator, args, load_models(args))
    task.prepare(task.cached(build_dataset(args, captions=False)))
    train(accelerator, args, task)
    task.export(out / "textual_inversion")     # learned_embeds.safetensors (diffusers) + <name>.safetensors (A1111)
    load_textual_inversion(pipe, out / "textual_inversion")  # either file; returns the token for prompts
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import safetensors.torch
import torch
from accelerate import Accelerator
from diffusers.loaders.textual_inversion import TEXT_INVERSION_NAME_SAFE
from transformers import CLIPTokenizer

from latentdiff.data.files import atomic_path
from latentdiff.training.models import Models
from latentdiff.training.run import writes_output
from latentdiff.training.text_to_image import TextToImage

TEXTUAL_INVERSION_DIR = "textual_inversion"
DIFFUSERS_WEIGHT_NAME = TEXT_INVERSION_NAME_SAFE  # learned_embeds.safetensors: {placeholder: (N, D)}
A1111_KEY = "emb_params"  # A1111's (and kohya's) safetensors embeddings: {"emb_params": (N, D)}, named by the file
LEARNABLE_PROPERTIES = ("object", "style")
# the templates of the paper's code and diffusers' example
OBJECT_TEMPLATES = (
    "a photo of a {}", "a rendering of a {}", "a cropped photo of the {}", "the photo of a {}",
    "a photo of a clean {}", "a photo of a dirty {}", "a dark photo of the {}", "a photo of my {}",
    "a photo of the cool {}", "a close-up photo of a {}", "a bright photo of the {}", "a cropped photo of a {}",
    "a photo of the {}", "a good photo of the {}", "a photo of one {}", "a close-up photo of the {}",
    "a rendition of the {}", "a photo of the clean {}", "a rendition of a {}", "a photo of a nice {}",
    "a good photo of a {}", "a photo of the nice {}", "a photo of the small {}", "a photo of the weird {}",
    "a photo of the large {}", "a photo of a cool {}", "a photo of a small {}",
)  # fmt: skip
STYLE_TEMPLATES = (
    "a painting in the style of {}", "a rendering in the style of {}", "a cropped painting in the style of {}",
    "the painting in the style of {}", "a clean painting in the style of {}", "a dirty painting in the style of {}",
    "a dark painting in the style of {}", "a picture in the style of {}", "a cool painting in the style of {}",
    "a close-up painting in the style of {}", "a bright painting in the style of {}",
    "a cropped painting in the style of {}", "a good painting in the style of {}",
    "a close-up painting in the style of {}", "a rendition in the style of {}", "a nice painting in the style of {}",
    "a small painting in the style of {}", "a weird painting in the style of {}",
    "a large painting in the style of {}",
)  # fmt: skip
TEMPLATES = {"object": OBJECT_TEMPLATES, "style": STYLE_TEMPLATES}


def add_textual_inversion_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    g = parser.add_argument_group("textual inversion")
    g.add_argument("--placeholder_token", type=str, required=True, help='The new word, e.g. "<cat-toy>".')
    g.add_argument(
        "--initializer_token", type=str, required=True,
        help="One existing token whose embedding the new vectors start from (a word close to the concept).",
    )  # fmt: skip
    g.add_argument("--num_vectors", type=int, default=1, help="Embedding vectors the placeholder stands for.")
    g.add_argument(
        "--learnable_property", type=str, default="object", choices=LEARNABLE_PROPERTIES,
        help='The caption templates: "a photo of a <tok>" (object) or "a painting in the style of <tok>" (style).',
    )  # fmt: skip
    return parser


def check_textual_inversion_args(args: argparse.Namespace) -> None:
    """Raise for flags that would fail later, the tokens checked against the pipeline folder's tokenizer."""
    if args.num_vectors < 1:
        raise ValueError(f"--num_vectors must be at least 1, got {args.num_vectors}")
    if args.save_pipeline_at_checkpoints:
        raise ValueError(
            "--save_pipeline_at_checkpoints is not for textual inversion: each checkpoint holds its "
            f"{DIFFUSERS_WEIGHT_NAME}, which load_textual_inversion opens"
        )
    tokenizer = CLIPTokenizer.from_pretrained(args.pretrained_model_name_or_path, subfolder="tokenizer")
    check_tokens(tokenizer, args.placeholder_token, args.initializer_token, args.num_vectors)


def placeholder_tokens(placeholder: str, num_vectors: int) -> list[str]:
    """The tokens of a placeholder of ``num_vectors`` vectors, as diffusers names them: <tok>, <tok>_1, ..."""
    return [placeholder] + [f"{placeholder}_{i}" for i in range(1, num_vectors)]


def check_tokens(tokenizer, placeholder: str, initializer: str, num_vectors: int) -> int:
    """Raise unless the placeholder's tokens are new words the tokenizer keeps whole and the initializer is one
    token; return the initializer's id."""
    if not placeholder or re.search(r"\s", placeholder) or placeholder != placeholder.lower():
        raise ValueError(
            f"--placeholder_token {placeholder!r} must be one lowercase word without spaces "
            "(CLIP's tokenizer lowercases prompts), e.g. '<cat-toy>'"
        )
    vocab = tokenizer.get_vocab()
    taken = [t for t in placeholder_tokens(placeholder, num_vectors) if t in vocab]
    if taken:
        raise ValueError(
            f"--placeholder_token {placeholder!r}: {', '.join(map(repr, taken))} is already in the tokenizer's "
            "vocabulary; choose a new word, e.g. '<my-concept>'"
        )
    ids = tokenizer.encode(initializer, add_special_tokens=False)
    if len(ids) != 1:
        pieces = tokenizer.convert_ids_to_tokens(ids)
        raise ValueError(
            f"--initializer_token {initializer!r} is {len(ids)} tokens ({pieces}), it must be exactly one: "
            "give a single common word"
        )
    return ids[0]


class PlaceholderEmbedding(torch.nn.Module):
    """A token embedding: the frozen table (V, D) for ids below V, the trained ``vectors`` (N, D) for V..V+N-1."""

    def __init__(self, table: torch.nn.Embedding, vectors: torch.Tensor):
        super().__init__()
        self.table = table.requires_grad_(False)
        self.vectors = torch.nn.Parameter(vectors)  # (N, D)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        num_known = self.table.num_embeddings
        known = self.table(input_ids.clamp(max=num_known - 1))  # (B, L, D)
        new = self.vectors[(input_ids - num_known).clamp(min=0)]  # (B, L, D)
        return torch.where((input_ids >= num_known)[..., None], new.to(known.dtype), known)


def add_placeholder(tokenizer, text_encoder, placeholder: str, initializer: str, num_vectors: int) -> PlaceholderEmbedding:
    """Add the placeholder's tokens to ``tokenizer`` and a ``PlaceholderEmbedding`` for them, started at the
    initializer token's embedding, to ``text_encoder``; return the embedding."""
    initializer_id = check_tokens(tokenizer, placeholder, initializer, num_vectors)
    table = text_encoder.get_input_embeddings()
    if len(tokenizer) != table.num_embeddings:
        raise ValueError(
            f"the tokenizer has {len(tokenizer)} tokens but the text encoder's embedding table "
            f"{table.num_embeddings} rows: the new tokens' ids would not be the new rows"
        )
    tokenizer.add_tokens(placeholder_tokens(placeholder, num_vectors))
    initial = table.weight.detach()[initializer_id].float().repeat(num_vectors, 1)  # (N, D)
    embedding = PlaceholderEmbedding(table, initial.clone())
    text_encoder.set_input_embeddings(embedding)
    return embedding


def save_textual_inversion(folder: str | Path, placeholder: str, vectors: torch.Tensor) -> list[Path]:
    """Write ``vectors`` (N, D) as diffusers' ``learned_embeds.safetensors`` ({placeholder: vectors}) and
    A1111's ``<name>.safetensors`` ({"emb_params": vectors}; A1111 names the word after the file), into
    ``folder``; return both paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vectors = vectors.detach().float().cpu().contiguous()  # (N, D)
    name = re.sub(r"[^\w.-]", "", placeholder).strip(".") or "embedding"
    paths = [folder / DIFFUSERS_WEIGHT_NAME, folder / f"{name}.safetensors"]
    for path, key in zip(paths, (placeholder, A1111_KEY), strict=True):
        with atomic_path(path) as tmp:
            safetensors.torch.save_file({key: vectors}, tmp, metadata={"format": "pt"})
    return paths


def read_textual_inversion(path: str | Path, token: str | None = None) -> tuple[str, torch.Tensor]:
    """(token, vectors (N, D)) from a textual-inversion safetensors file, or a folder holding
    learned_embeds.safetensors: diffusers' layout names its token; A1111's is named by ``token`` or the file."""
    path = Path(path)
    file = path / DIFFUSERS_WEIGHT_NAME if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"{str(file)!r}: no such file (give a .safetensors file or a folder with {DIFFUSERS_WEIGHT_NAME})")
    if file.suffix != ".safetensors":
        raise ValueError(f"{str(file)!r} is not a .safetensors file; pickled embeddings (.pt, .bin) are refused")
    state = safetensors.torch.load_file(file)
    if len(state) != 1:
        raise ValueError(
            f"{str(file)!r} holds {len(state)} tensors ({', '.join(sorted(state))}); a textual inversion file "
            f"holds one: {{token: (N, D)}} (diffusers) or {{{A1111_KEY!r}: (N, D)}} (A1111)"
        )
    (key, vectors), = state.items()
    if token is None:
        token = file.stem if key == A1111_KEY else key
    return token, vectors.reshape(-1, vectors.shape[-1])  # (N, D)


def load_textual_inversion(pipe, path: str | Path, token: str | None = None) -> str:
    """Load an embedding in diffusers' or A1111's layout into ``pipe``'s tokenizer and text encoder, through
    diffusers' ``TextualInversionLoaderMixin.load_textual_inversion``; return the token to write in prompts
    (the pipeline writes a multi-vector token out, "<tok>" -> "<tok> <tok>_1 ...", by ``maybe_convert_prompt``).

    Safetensors only, and a vector size other than the text encoder's is refused before anything changes.
    """
    token, vectors = read_textual_inversion(path, token)
    size = pipe.text_encoder.get_input_embeddings().embedding_dim
    if vectors.shape[-1] != size:
        raise ValueError(
            f"{str(path)!r} holds vectors of size {vectors.shape[-1]}, but this text encoder's token embeddings "
            f"have size {size}: the embedding was trained for another text encoder"
        )
    pipe.load_textual_inversion({token: vectors}, token=token)
    return token


class TextualInversion(TextToImage):
    """Text-to-image training in which only the placeholder's embedding vectors train."""

    def __init__(self, accelerator: Accelerator, args, models: Models):
        self.placeholder = args.placeholder_token
        self.embedding = add_placeholder(
            models.tokenizer, models.text_encoder, args.placeholder_token, args.initializer_token, args.num_vectors
        )
        super().__init__(accelerator, args, models, train_text_encoder=True, train_unet=False)
        self.text_encoder.requires_grad_(False)
        self.embedding.vectors.requires_grad_(True)
        self.templates = TEMPLATES[args.learnable_property]
        self.placeholder_text = " ".join(placeholder_tokens(args.placeholder_token, args.num_vectors))

    def prepare(self, dataset) -> None:
        self.register_checkpointing()
        super().prepare(dataset)

    def register_checkpointing(self) -> None:
        """Checkpoints hold the vectors as learned_embeds.safetensors, not the text encoder: the frozen weights
        come from the pipeline folder again, and a checkpoint folder opens with ``load_textual_inversion``."""
        accelerator = self.accelerator

        def ours(model) -> bool:
            return accelerator.unwrap_model(model) is accelerator.unwrap_model(self.text_encoder)

        def save_hook(models: list, weights: list, output_dir: str) -> None:
            if writes_output(accelerator):
                save_textual_inversion(output_dir, self.placeholder, self.embedding.vectors)
            for i in reversed(range(len(models))):  # accelerate saves what is left in `weights`
                if ours(models[i]):
                    weights.pop(i)

        def load_hook(models: list, input_dir: str) -> None:
            _, vectors = read_textual_inversion(input_dir)
            with torch.no_grad():
                self.embedding.vectors.copy_(vectors)
            for i in reversed(range(len(models))):  # accelerate loads what is left in `models`
                if ours(models[i]):
                    models.pop(i)

        accelerator.register_save_state_pre_hook(save_hook)
        accelerator.register_load_state_pre_hook(load_hook)

    def loss(self, batch: dict, generator: torch.Generator, step: int) -> tuple[torch.Tensor, dict]:
        """TextToImage's loss with each caption a template, drawn from ``generator``, around the placeholder."""
        picks = torch.randint(len(self.templates), (len(batch["text"]),), generator=generator, device=generator.device)
        captions = [self.templates[i].format(self.placeholder_text) for i in picks.tolist()]
        return super().loss({**batch, "text": captions}, generator, step)

    def denoise(self, x_t: torch.Tensor, t: torch.Tensor, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        with self.accelerator.autocast():  # the frozen UNet is not prepared, so it brings no autocast of its own
            return super().denoise(x_t, t, encoder_hidden_states)

    def export(self, path: Path) -> Path:
        """Write the vectors (their EMA with --use_ema) in diffusers' and A1111's layouts into ``path``. Every
        process calls it; the main process writes."""
        if writes_output(self.accelerator):
            with self.averaged():
                save_textual_inversion(path, self.placeholder, self.embedding.vectors)
        self.accelerator.wait_for_everyone()
        self.accelerator.end_training()
        return Path(path)
