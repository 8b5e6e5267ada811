"""Single-file checkpoints: a pipeline folder <-> the original Stable Diffusion 1.x / 2.x layout.

The original layout (CompVis' LatentDiffusion, as AUTOMATIC1111 and ComfyUI read it) is one file
holding the UNet under ``model.diffusion_model.``, the VAE under ``first_stage_model.`` and the text
encoder under ``cond_stage_model.transformer.`` (SD 1.x: Hugging Face CLIP names) or
``cond_stage_model.model.`` (SD 2.x: OpenCLIP names, q/k/v fused into ``in_proj``). Names are
translated through one key map built from the components' configs, the way nanoGPT imports GPT-2: a
table, then asserts: every key of the source is used once and every key of the target is written
once, and a shape that differs from the config's is an error, all before a weight is read.
The reference is diffusers' own converters (``scripts/convert_diffusers_to_original_stable_diffusion.py``
and ``diffusers.loaders.single_file_utils``); tests/test_single_file.py checks both directions.

    to_single_file("out/pipeline", "model.safetensors", half=True)
    pipe = from_single_file("model.safetensors", config="out/pipeline")
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel

UNET, VAE, TEXT = "unet", "vae", "text_encoder"
PREFIX = {UNET: "model.diffusion_model.", VAE: "first_stage_model."}
TEXT_PREFIX = {"sd1": "cond_stage_model.transformer.text_model.", "sd2": "cond_stage_model.model."}
WEIGHT_FILES = {UNET: "diffusion_pytorch_model", VAE: "diffusion_pytorch_model", TEXT: "model"}
# Keys of original checkpoints that hold nothing a pipeline folder keeps: LatentDiffusion's noise-schedule
# buffers (the folder's scheduler config has the schedule), the EMA bookkeeping and older transformers'
# position ids. EMA weights (``model_ema.*``, in full training checkpoints) are skipped as diffusers does.
UNUSED_KEYS = frozenset((
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
    "logvar", "cond_stage_model.transformer.text_model.embeddings.position_ids",
    # SD 2.x: OpenCLIP's contrastive head, unused by a model that conditions on the penultimate layer's tokens
    "cond_stage_model.model.text_projection", "cond_stage_model.model.logit_scale",
))
UNUSED_PREFIXES = ("model_ema.",)
SHOWN_KEYS = 8  # keys an error message lists before "... and N more"

# module renames inside one block: (diffusers, CompVis)
UNET_RESNET = (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("time_emb_proj", "emb_layers.1"),
               ("norm2", "out_layers.0"), ("conv2", "out_layers.3"), ("conv_shortcut", "skip_connection"))
UNET_OUTER = (("time_embedding.linear_1", "time_embed.0"), ("time_embedding.linear_2", "time_embed.2"),
              ("conv_in", "input_blocks.0.0"), ("conv_norm_out", "out.0"), ("conv_out", "out.2"))
VAE_RESNET = (("norm1", "norm1"), ("conv1", "conv1"), ("norm2", "norm2"), ("conv2", "conv2"),
              ("conv_shortcut", "nin_shortcut"))
VAE_OUTER = (("encoder.conv_in", "encoder.conv_in"), ("encoder.conv_out", "encoder.conv_out"),
             ("encoder.conv_norm_out", "encoder.norm_out"), ("decoder.conv_in", "decoder.conv_in"),
             ("decoder.conv_out", "decoder.conv_out"), ("decoder.conv_norm_out", "decoder.norm_out"),
             ("quant_conv", "quant_conv"), ("post_quant_conv", "post_quant_conv"))
# CompVis' VAE attention stores q, k, v and proj_out as 1x1 convolutions, diffusers as linears
VAE_ATTENTION = (("group_norm", "norm", "copy"), ("to_q", "q", "conv1x1"), ("to_k", "k", "conv1x1"),
                 ("to_v", "v", "conv1x1"), ("to_out.0", "proj_out", "conv1x1"))
OPENCLIP_OUTER = (("embeddings.token_embedding", "token_embedding"),
                  ("embeddings.position_embedding.weight", "positional_embedding"),
                  ("final_layer_norm", "ln_final"))
OPENCLIP_LAYER = (("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"),
                  ("mlp.fc2", "mlp.c_proj"), ("self_attn.out_proj", "attn.out_proj"))
QKV = ("q_proj", "k_proj", "v_proj")  # OpenCLIP's in_proj is their concatenation along dim 0, in this order


@dataclass(frozen=True)
class Rule:
    """A CompVis name and how its tensor is made from the diffusers tensors named in ``sources``."""

    name: str
    transform: str  # "copy", "conv1x1" (VAE attention) or "qkv" (OpenCLIP's fused in_proj)
    sources: tuple[tuple[str, str], ...]  # (component, diffusers key), in concatenation order


def _unet_table(config) -> dict[str, tuple[str, str]]:
    """diffusers module path -> (CompVis path, transform) for an SD-shaped UNet: CompVis numbers
    ``input_blocks`` / ``output_blocks`` consecutively over all levels, each holding [resnet, attention]
    or [downsample] / [resnet, attention, upsample]."""
    table = {diffusers: (compvis, "copy") for diffusers, compvis in UNET_OUTER}

    def resnet(diffusers, compvis):
        table.update({f"{diffusers}.{a}": (f"{compvis}.{b}", "copy") for a, b in UNET_RESNET})

    levels, layers = len(config["down_block_types"]), config["layers_per_block"]
    block = 1
    for i, kind in enumerate(config["down_block_types"]):
        for j in range(layers):
            resnet(f"down_blocks.{i}.resnets.{j}", f"input_blocks.{block}.0")
            if "CrossAttn" in kind:
                table[f"down_blocks.{i}.attentions.{j}"] = (f"input_blocks.{block}.1", "copy")
            block += 1
        if i < levels - 1:
            table[f"down_blocks.{i}.downsamplers.0.conv"] = (f"input_blocks.{block}.0.op", "copy")
            block += 1
    resnet("mid_block.resnets.0", "middle_block.0")
    table["mid_block.attentions.0"] = ("middle_block.1", "copy")
    resnet("mid_block.resnets.1", "middle_block.2")
    block = 0
    for i, kind in enumerate(config["up_block_types"]):
        for j in range(layers + 1):
            resnet(f"up_blocks.{i}.resnets.{j}", f"output_blocks.{block}.0")
            if "CrossAttn" in kind:
                table[f"up_blocks.{i}.attentions.{j}"] = (f"output_blocks.{block}.1", "copy")
            block += 1
        if i < levels - 1:
            upsample = 2 if "CrossAttn" in kind else 1
            table[f"up_blocks.{i}.upsamplers.0.conv"] = (f"output_blocks.{block - 1}.{upsample}.conv", "copy")
    return table


def _vae_table(config) -> dict[str, tuple[str, str]]:
    """diffusers module path -> (CompVis path, transform) for an AutoencoderKL: CompVis numbers the
    decoder's levels from the lowest resolution up, diffusers from the top down."""
    table = {diffusers: (compvis, "copy") for diffusers, compvis in VAE_OUTER}

    def resnet(diffusers, compvis):
        table.update({f"{diffusers}.{a}": (f"{compvis}.{b}", "copy") for a, b in VAE_RESNET})

    levels, layers = len(config["down_block_types"]), config["layers_per_block"]
    for i in range(levels):
        for j in range(layers):
            resnet(f"encoder.down_blocks.{i}.resnets.{j}", f"encoder.down.{i}.block.{j}")
        if i < levels - 1:
            table[f"encoder.down_blocks.{i}.downsamplers.0.conv"] = (f"encoder.down.{i}.downsample.conv",
                                                                    "copy")
        level = levels - 1 - i
        for j in range(layers + 1):
            resnet(f"decoder.up_blocks.{i}.resnets.{j}", f"decoder.up.{level}.block.{j}")
        if i < levels - 1:
            table[f"decoder.up_blocks.{i}.upsamplers.0.conv"] = (f"decoder.up.{level}.upsample.conv", "copy")
    for coder in ("encoder", "decoder"):
        for j in range(2):
            resnet(f"{coder}.mid_block.resnets.{j}", f"{coder}.mid.block_{j + 1}")
        for a, b, transform in VAE_ATTENTION:
            table[f"{coder}.mid_block.attentions.0.{a}"] = (f"{coder}.mid.attn_1.{b}", transform)
    return table


def _text_table(config, layout: str) -> dict[str, tuple[str, str]]:
    """diffusers module path -> (CompVis path, transform): SD 1.x keeps transformers' CLIP names (of
    transformers 4, which nested them under ``text_model.``), SD 2.x uses OpenCLIP's."""
    if layout == "sd1":
        return {name: (name, "copy") for name in ("embeddings", "encoder", "final_layer_norm")}
    table = {diffusers: (compvis, "copy") for diffusers, compvis in OPENCLIP_OUTER}
    for k in range(config["num_hidden_layers"]):
        ours, theirs = f"encoder.layers.{k}", f"transformer.resblocks.{k}"
        table.update({f"{ours}.{a}": (f"{theirs}.{b}", "copy") for a, b in OPENCLIP_LAYER})
        for part in QKV:
            for param in ("weight", "bias"):
                table[f"{ours}.self_attn.{part}.{param}"] = (f"{theirs}.attn.in_proj_{param}", "qkv")
    return table


def _rename(key: str, table: dict[str, tuple[str, str]]) -> tuple[str, str] | None:
    """The longest module path of ``key`` in ``table`` decides its CompVis name; the rest is kept."""
    parts = key.split(".")
    for n in range(len(parts), 0, -1):
        if (hit := table.get(".".join(parts[:n]))) is not None:
            return ".".join([hit[0], *parts[n:]]), hit[1]
    return None


def key_map(configs: dict[str, dict], keys: dict[str, list[str]], layout: str) -> dict[str, Rule]:
    """CompVis key -> Rule for the diffusers ``keys`` of each component (their state dict's names).

    Asserted: every diffusers key has a CompVis name, no two share one (except OpenCLIP's q, k and v,
    which make one in_proj together), so a conversion through this map uses every key exactly once.
    """
    tables = {UNET: _unet_table(configs[UNET]), VAE: _vae_table(configs[VAE]),
              TEXT: _text_table(configs[TEXT], layout)}
    prefixes = {**PREFIX, TEXT: TEXT_PREFIX[layout]}
    sources, transforms, unnamed = defaultdict(list), {}, []
    for component, names in keys.items():
        for key in names:
            hit = _rename(key, tables[component])
            if hit is None:
                unnamed.append(f"{component}/{key}")
                continue
            name, transform = prefixes[component] + hit[0], hit[1]
            sources[name].append((component, key))
            transforms[name] = transform
    if unnamed:
        raise ValueError(f"{_listing(unnamed)} have no name in the original SD layout: this converter knows "
                         "SD 1.x/2.x UNets (CrossAttnDownBlock2D/DownBlock2D levels), AutoencoderKL and CLIP")
    rules = {}
    for name, src in sources.items():
        if transforms[name] == "qkv":
            order = {part: n for n, part in enumerate(QKV)}
            src = sorted(src, key=lambda s: order[s[1].split(".")[-2]])
            assert [s[1].split(".")[-2] for s in src] == list(QKV), (name, src)
        else:
            assert len(src) == 1, f"{name} would be written by {src}"
        rules[name] = Rule(name, transforms[name], tuple(src))
    return rules


def _listing(keys) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:SHOWN_KEYS])
    more = f" ... and {len(keys) - SHOWN_KEYS} more" if len(keys) > SHOWN_KEYS else ""
    return f"{len(keys)} key{'s' if len(keys) != 1 else ''} ({shown}{more})"


def _read_configs(folder: Path, tokenizer: bool = False) -> dict[str, dict]:
    """The three networks' configs of a pipeline folder (``tokenizer``: which must have one, too)."""
    if not folder.is_dir():
        raise FileNotFoundError(f"pipeline folder {str(folder)!r} does not exist")
    if not (folder / "model_index.json").is_file():
        raise ValueError(f"{str(folder)!r} is not a pipeline folder: it has no model_index.json")
    missing = [c for c in (UNET, VAE, TEXT) if not (folder / c / "config.json").is_file()]
    if missing:
        raise ValueError(f"pipeline folder {str(folder)!r} has no config.json for: {', '.join(missing)}")
    if tokenizer and not (folder / "tokenizer").is_dir():
        raise ValueError(f"pipeline folder {str(folder)!r} has no tokenizer/ folder")
    return {c: json.loads((folder / c / "config.json").read_text()) for c in (UNET, VAE, TEXT)}


def _empty_models(configs: dict[str, dict]) -> dict[str, torch.nn.Module]:
    """The three networks with their parameters on the meta device: names and shapes, no memory."""
    with init_empty_weights():
        return {UNET: UNet2DConditionModel.from_config(configs[UNET]),
                VAE: AutoencoderKL.from_config(configs[VAE]),
                TEXT: CLIPTextModel(CLIPTextConfig.from_dict(configs[TEXT]))}


def _layout(text_config: dict) -> str:
    """OpenAI's CLIP (SD 1.x) uses quick_gelu, OpenCLIP's ViT-H (SD 2.x) gelu."""
    return "sd2" if text_config.get("hidden_act") == "gelu" else "sd1"


def _compvis_shape(rule: Rule, shapes: dict[str, dict[str, tuple]]) -> tuple:
    first = shapes[rule.sources[0][0]][rule.sources[0][1]]
    if rule.transform == "qkv":
        return (sum(shapes[c][k][0] for c, k in rule.sources), *first[1:])
    if rule.transform == "conv1x1" and len(first) == 2:
        return (*first, 1, 1)
    return tuple(first)


def _check(what: str, found: dict[str, tuple], expected: dict[str, tuple], ignored=lambda key: False):
    """Keys and shapes of a source against what the config implies: a ValueError naming each difference."""
    missing = sorted(set(expected) - set(found))
    unknown = sorted(key for key in set(found) - set(expected) if not ignored(key))
    problems = []
    if missing:
        problems.append(f"{_listing(missing)} missing")
    if unknown:
        problems.append(f"{_listing(unknown)} unknown")
    wrong = [f"{key}: {tuple(found[key])} where the config makes {tuple(expected[key])}"
             for key in sorted(set(found) & set(expected)) if tuple(found[key]) != tuple(expected[key])]
    if wrong:
        problems.append(f"{len(wrong)} of another shape (another architecture than the config's?): "
                        + "; ".join(wrong[:SHOWN_KEYS]) + (" ..." if len(wrong) > SHOWN_KEYS else ""))
    if problems:
        raise ValueError(f"{what}: " + "; ".join(problems))


def _weight_files(folder: Path, component: str) -> list[Path]:
    stem = WEIGHT_FILES[component]
    index = folder / component / f"{stem}.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / component / shard for shard in shards]
    path = folder / component / f"{stem}.safetensors"
    if not path.is_file():
        there = sorted(p.name for p in (folder / component).iterdir())
        raise ValueError(f"{str(folder / component)!r} has no {stem}.safetensors (it holds: "
                         f"{', '.join(there)}); export reads safetensors weights only")
    return [path]


def _folder_keys(folder: Path, component: str) -> dict[str, tuple[Path, str]]:
    """A component's saved key -> (file, key as saved). A text encoder saved by transformers 4 nests its
    names under ``text_model.``; transformers 5's CLIPTextModel does not, so the prefix is dropped."""
    keys = {}
    for path in _weight_files(folder, component):
        with safe_open(path, "pt") as f:
            for key in f.keys():
                name = key.removeprefix("text_model.") if component == TEXT else key
                if name in keys:
                    raise ValueError(f"{str(path)!r} holds {name!r} twice (as {keys[name][1]!r} and {key!r})")
                keys[name] = (path, key)
    return keys


def to_single_file(pipeline_dir, out_path, half: bool = False) -> Path:
    """Write the UNet, VAE and text encoder of ``pipeline_dir`` as one safetensors file in the original
    SD layout (SD 2.x's OpenCLIP names when the text encoder uses gelu, else SD 1.x's); ``half`` stores
    fp16. Returns the path written."""
    folder, out_path = Path(pipeline_dir), Path(out_path)
    if out_path.suffix != ".safetensors":
        raise ValueError(f"out_path {str(out_path)!r} must end in .safetensors (pickle .ckpt is not written)")
    configs = _read_configs(folder)
    models = _empty_models(configs)
    saved = {c: _folder_keys(folder, c) for c in models}
    with ExitStack() as stack:
        files = {path: stack.enter_context(safe_open(path, "pt"))
                 for keys in saved.values() for path, _ in keys.values()}
        shapes = {}
        for component, keys in saved.items():
            found = {name: tuple(files[path].get_slice(key).get_shape()) for name, (path, key) in keys.items()}
            shapes[component] = {k: tuple(v.shape) for k, v in models[component].state_dict().items()}
            _check(f"{str(folder / component)!r}", found, shapes[component])
        rules = key_map(configs, {c: list(s) for c, s in shapes.items()}, _layout(configs[TEXT]))
        state = {}
        for rule in rules.values():
            parts = [files[saved[c][k][0]].get_tensor(saved[c][k][1]) for c, k in rule.sources]
            tensor = torch.cat(parts) if rule.transform == "qkv" else parts[0]  # 3 x (C, ...) -> (3C, ...)
            if rule.transform == "conv1x1" and tensor.ndim == 2:
                tensor = tensor.reshape(*tensor.shape, 1, 1)  # (C, C) -> (C, C, 1, 1)
            state[rule.name] = (tensor.half() if half and tensor.is_floating_point() else tensor).contiguous()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, out_path, metadata={"format": "pt"})
    return out_path


def _ignored(layout: str, text_config: dict):
    # SD 2.x conditions on OpenCLIP's penultimate layer: the text encoder drops the last one, the file keeps it
    last_layer = f"{TEXT_PREFIX['sd2']}transformer.resblocks.{text_config['num_hidden_layers']}."
    return lambda key: (key in UNUSED_KEYS or key.startswith(UNUSED_PREFIXES)
                        or (layout == "sd2" and key.startswith(last_layer)))


def _open_single_file(path: Path, allow_pickle: bool):
    """(key -> shape, key -> tensor loader) of a single file; a pickle is loaded whole, and only if allowed."""
    if path.suffix == ".safetensors":
        with safe_open(path, "pt") as f:
            shapes = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}

        def load(keys):
            with safe_open(path, "pt") as f:
                return {key: f.get_tensor(key) for key in keys}
        return shapes, load
    if path.suffix not in (".ckpt", ".pt", ".pth", ".bin"):
        raise ValueError(f"{str(path)!r}: expected a .safetensors (or, with allow_pickle, a .ckpt) file")
    if not allow_pickle:
        raise ValueError(f"{str(path)!r} is a pickle, which can run code when loaded: convert it from a source "
                         "you trust with allow_pickle=True (--allow_pickle), or use a .safetensors file")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    state = checkpoint.get("state_dict", checkpoint)
    state = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    return {k: tuple(v.shape) for k, v in state.items()}, lambda keys: {k: state[k] for k in keys}


def read_single_file(path, config, allow_pickle: bool = False,
                     torch_dtype=torch.float32) -> dict[str, torch.nn.Module]:
    """The UNet, VAE and text encoder of a single-file checkpoint, built from the configs of the pipeline
    folder ``config``; keys and shapes are checked against those configs before any weight is read."""
    path, folder = Path(path), Path(config)
    if not path.is_file():
        raise FileNotFoundError(f"single file {str(path)!r} does not exist")
    configs = _read_configs(folder)
    shapes, load = _open_single_file(path, allow_pickle)
    layout = "sd2" if any(k.startswith(TEXT_PREFIX["sd2"]) for k in shapes) else "sd1"
    models = _empty_models(configs)
    model_shapes = {c: {k: tuple(v.shape) for k, v in m.state_dict().items()} for c, m in models.items()}
    rules = key_map(configs, {c: list(s) for c, s in model_shapes.items()}, layout)
    expected = {name: _compvis_shape(rule, model_shapes) for name, rule in rules.items()}
    # a VAE attention weight stored as a linear (C, C) is accepted as well as CompVis' (C, C, 1, 1)
    found = {k: (*s, 1, 1) if k in rules and rules[k].transform == "conv1x1" and len(s) == 2 else s
             for k, s in shapes.items()}
    _check(f"{str(path)!r} against the config in {str(folder)!r}", found, expected,
           _ignored(layout, configs[TEXT]))
    tensors = load(list(rules))
    states = {c: {} for c in models}
    for name, rule in rules.items():
        tensor = tensors[name].to(torch_dtype) if torch_dtype is not None else tensors[name]
        if rule.transform == "qkv":
            parts = tensor.chunk(3)  # (3C, ...) -> 3 x (C, ...)
            for (component, key), part in zip(rule.sources, parts, strict=True):
                states[component][key] = part.clone()
            continue
        if rule.transform == "conv1x1" and tensor.ndim == 4:
            tensor = tensor[:, :, 0, 0]  # (C, C, 1, 1) -> (C, C)
        component, key = rule.sources[0]
        states[component][key] = tensor.contiguous()
    for component, model in models.items():
        model.load_state_dict(states[component], strict=True, assign=True)
        model.eval()
    return models


def _scheduler(folder: Path):
    """The config folder's scheduler: ours for the names ours are number-equal to, else diffusers'."""
    import diffusers

    from latentdiff.schedulers import DDIMScheduler, DDPMScheduler

    entry = json.loads((folder / "model_index.json").read_text()).get("scheduler") or [None, "DDIMScheduler"]
    name = entry[1]
    cls = {"DDIMScheduler": DDIMScheduler, "DDPMScheduler": DDPMScheduler}.get(name) or getattr(diffusers, name, None)
    if cls is None:
        raise ValueError(f"{str(folder)!r}: model_index.json names scheduler {name!r}, not a diffusers class")
    return cls.from_pretrained(folder, subfolder="scheduler")


def from_single_file(path, config, allow_pickle: bool = False, torch_dtype=torch.float32):
    """A LatentDiffPipeline from a single-file SD 1.x/2.x checkpoint; ``config`` is a local pipeline
    folder giving the components' configs, the tokenizer and the scheduler (its weights, if any, are
    not read; nothing is downloaded). ``.ckpt`` pickles load only with ``allow_pickle=True``."""
    from transformers import CLIPTokenizer

    from latentdiff.pipelines import LatentDiffPipeline

    folder = Path(config)
    _read_configs(folder, tokenizer=True)
    models = read_single_file(path, config, allow_pickle=allow_pickle, torch_dtype=torch_dtype)
    return LatentDiffPipeline(vae=models[VAE], text_encoder=models[TEXT],
                              tokenizer=CLIPTokenizer.from_pretrained(folder / "tokenizer"),
                              unet=models[UNET], scheduler=_scheduler(folder))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="latentdiff convert",
        description="Convert a pipeline folder to one SD-layout .safetensors file, or such a file to a folder.")
    parser.add_argument("src", help="a pipeline folder, or a .safetensors (.ckpt with --allow_pickle) file")
    parser.add_argument("dst", help="the .safetensors file to write, or the pipeline folder to write")
    parser.add_argument("--half", action="store_true", help="store the weights in fp16")
    parser.add_argument("--config", default=None,
                        help="file -> folder (required there): a local pipeline folder giving the configs "
                             "and tokenizer")
    parser.add_argument("--allow_pickle", action="store_true",
                        help="read a .ckpt pickle (it can run code when loaded: only from a source you trust)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """``latentdiff convert SRC DST [--half] [--config DIR] [--allow_pickle]``: a folder SRC is written as a
    single file, a file SRC as a folder. Input a user can fix raises ValueError or FileNotFoundError."""
    args = build_parser().parse_args(argv)
    src = Path(args.src)
    if src.is_dir():
        if args.config is not None or args.allow_pickle:
            raise ValueError("--config and --allow_pickle apply to a single-file SRC; SRC is a folder")
        to_single_file(src, args.dst, half=args.half)
        return 0
    if args.config is None:
        raise ValueError(f"converting the file {args.src!r} to a folder needs --config DIR: a local pipeline "
                         "folder with the components' configs and the tokenizer")
    pipe = from_single_file(src, args.config, allow_pickle=args.allow_pickle)
    if args.half:
        pipe.to(dtype=torch.float16)
    pipe.save_pretrained(args.dst)
    return 0
