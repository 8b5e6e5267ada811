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


def tokenize(tokenizer, prompts: list[str], warn_truncated: bool = False) -> torch.Tensor:
    """Token ids padded to the tokenizer's length, (B, L); longer prompts are truncated."""
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
    return tokenizer(
        prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt"
    ).input_ids  # (B, L)


def encode_prompts(tokenizer, text_encoder, prompts: list[str], warn_truncated: bool = False) -> torch.Tensor:
    """The text encoder's last hidden states for each prompt, (B, L, D): the UNet's cross-attention context."""
    input_ids = tokenize(tokenizer, prompts, warn_truncated).to(text_encoder.device)
    return text_encoder(input_ids)[0]  # (B, L, D)
