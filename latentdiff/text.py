"""Prompt cleaning, tokenisation and encoding, shared by training and sampling.

Training and sampling must turn a caption into tokens the same way, or the model is asked at
sampling time for token sequences it never saw. OpenAI's CLIP tokenizer cleans text with
ftfy and HTML unescaping before BPE; we do the same for every caption and prompt.
"""

from __future__ import annotations

import html
import logging
import re

import ftfy
import torch

logger = logging.getLogger(__name__)


def clean_prompt(text: str) -> str:
    """OpenAI CLIP's ``basic_clean`` followed by ``whitespace_clean``."""
    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text))
    return re.sub(r"\s+", " ", text).strip()


def tokenize(tokenizer, prompts: list[str], warn_truncated: bool = False):
    """The tokenizer's output for ``prompts`` padded to its length: input_ids and attention_mask, (B, L) each;
    longer prompts are truncated."""
    prompts = [clean_prompt(p) for p in prompts]
    max_length = tokenizer.model_max_length
    if warn_truncated:
        for ids in tokenizer(prompts, truncation=False).input_ids:
            if len(ids) > max_length:
                kept = tokenizer.decode(ids[1 : max_length - 1])
                logger.warning(
                    "prompt has %d tokens, more than the text encoder's %d: it was truncated to %r",
                    len(ids), max_length, kept,
                )
    return tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")


def uses_attention_mask(text_encoder) -> bool:
    """Whether prompts go in with their attention mask: diffusers' StableDiffusionPipeline.encode_prompt's rule
    (only where the encoder's config sets ``use_attention_mask``), kept here so that a folder gives the same
    states in both. CLIP (trained unmasked, its causal mask keeping padding out of the prompt's states) is not
    masked; a BERT loaded by latentdiff.text_encoders is."""
    model = getattr(text_encoder, "module", text_encoder)  # a model that accelerate wrapped for DDP
    return bool(getattr(model.config, "use_attention_mask", False))


def text_encoder_outputs(tokenizer, text_encoder, prompts: list[str], warn_truncated: bool = False, device=None,
                         **kwargs):  # fmt: skip
    """The text encoder's outputs for ``prompts`` (``kwargs`` go to its forward), on ``device`` (default: the
    encoder's)."""
    tokens = tokenize(tokenizer, prompts, warn_truncated)
    device = text_encoder.device if device is None else device
    attention_mask = tokens.attention_mask.to(device) if uses_attention_mask(text_encoder) else None  # (B, L)
    return text_encoder(tokens.input_ids.to(device), attention_mask=attention_mask, **kwargs)


def encode_prompts(tokenizer, text_encoder, prompts: list[str], warn_truncated: bool = False, device=None) -> torch.Tensor:
    """The text encoder's last hidden states for each prompt, (B, L, D): the UNet's cross-attention context."""
    return text_encoder_outputs(tokenizer, text_encoder, prompts, warn_truncated, device)[0]  # (B, L, D)
