"""How far apart does a frozen, randomly initialised CLIP text encoder hold prompts that differ in one word?

Builds the ``small`` preset's text encoder (seeded), multiplies its token embeddings by ``--scale``
(CLIP's init draws them N(0, 0.02)), prints the cosine similarity of the six shapes colors' final states
at the color word's position and two later ones, and with ``--out`` saves the encoder as a CLIPTextModel
folder, for ``train_ldm.py --pretrained_text_encoder_name_or_path DIR --no-train_text_encoder``.
Issue 20's A/B (benchmarks/results/token_embedding_scale_ab_cpu.jsonl):

    python benchmarks/random_text_encoder.py --scale 25 --out out/te_x25_s0
"""

from __future__ import annotations

import argparse

import torch

from latentdiff.data.shapes import COLORS, caption
from latentdiff.presets import scale_token_embeddings, text_encoder_from_preset, tokenizer_for


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=float, default=1.0, help="factor on the token embeddings")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="save the encoder here")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    encoder = text_encoder_from_preset("small").eval()
    scale_token_embeddings(encoder, 0.02 * args.scale)
    tokenizer = tokenizer_for(encoder)
    names = list(COLORS)
    prompts = [caption(color, "circle", "large", "center") for color in names]
    ids = tokenizer(prompts, padding="max_length", truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        states = encoder(ids).last_hidden_state
    off_diagonal = ~torch.eye(len(names), dtype=torch.bool)
    for position in (3, 8, 20):  # 3: the color word ("<bos> a large red ..."); 8: the first padding
        v = torch.nn.functional.normalize(states[:, position], dim=-1)
        similarity = v @ v.T
        print(f"position {position}: cosine between colors mean {similarity[off_diagonal].mean():.3f}, "
              f"max {similarity[off_diagonal].max():.3f}, red-orange {similarity[0, 1]:.3f}")
    if args.out:
        encoder.save_pretrained(args.out, safe_serialization=True)


if __name__ == "__main__":
    main()
