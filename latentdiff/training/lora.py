"""LoRA adapters (Hu et al. 2022) through peft, the way diffusers integrates it; saved and loaded in diffusers'
format, so `pipe.load_lora_weights(folder)` works on LatentDiffPipeline and on StableDiffusionPipeline alike, or in
kohya-ss sd-scripts' format (`lora_unet_..._to_q.lora_down.weight`, `.alpha`), which AUTOMATIC1111 and ComfyUI read
and diffusers' loader converts.

A LoRA layer adds a low-rank update to a frozen linear map W (out x in): h = W x + (alpha / r) B A x, with
A (r x in) and B (out x r) trained and B starting at zero, so training starts exactly from the base model
(Hu et al. 2022, eq. 3). Each adapted layer trains r (in + out) parameters.

    add_lora(unet, UNET_TARGET_MODULES, rank=4)              # base frozen, adapters trainable
    register_lora_checkpointing(accelerator, unet)            # checkpoints hold the adapters only
    save_lora(out / "lora", unet)                             # pytorch_lora_weights.safetensors
    save_lora_kohya(out / "lora", unet)                       # pytorch_lora_weights_kohya.safetensors
    load_lora(pipe, out / "lora")                             # either; every weight must find its layer
"""

from __future__ import annotations

import argparse
from importlib.metadata import version
from pathlib import Path

import torch
from accelerate import Accelerator
from diffusers.training_utils import cast_training_params
from diffusers.utils import (
    convert_state_dict_to_diffusers,
    convert_state_dict_to_peft,
    convert_unet_state_dict_to_peft,
)
from diffusers.utils.peft_utils import get_adapter_name
from packaging.version import Version
from peft import LoraConfig
from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import save_file
from transformers.integrations import peft as transformers_peft

from latentdiff.data.files import atomic_path
from latentdiff.pipelines import LatentDiffPipeline
from latentdiff.training.run import writes_output

# the attention projections: what diffusers' and the LoRA paper's (W_q, W_k, W_v, W_o) adapters target
UNET_TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_ENCODER_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "out_proj")
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # diffusers' name, which load_lora_weights looks for
# load_lora_weights(folder) reads it when it is the folder's only .safetensors (diffusers' name first otherwise)
KOHYA_WEIGHT_NAME = "pytorch_lora_weights_kohya.safetensors"
SAVE_FORMATS = ("diffusers", "kohya")
# kohya-ss sd-scripts, networks/lora.py: LORA_PREFIX_UNET, LORA_PREFIX_TEXT_ENCODER
KOHYA_PREFIXES = {"unet": "lora_unet", "text_encoder": "lora_te"}
LORA_DIR = "lora"
ADAPTER_NAME = "default"
# the key prefix of each component in a LoRA file, and how its keys become peft's when a checkpoint is resumed
COMPONENTS = {
    "unet": convert_unet_state_dict_to_peft,  # "to_q.lora.down.weight" -> "to_q.lora_A.weight"
    "text_encoder": convert_state_dict_to_peft,  # "q_proj.lora_linear_layer.down.weight" -> "q_proj.lora_A.weight"
}


def add_lora_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    g = parser.add_argument_group("LoRA")
    g.add_argument("--rank", type=int, default=4, help="r, the rank of each adapter's update B A.")
    g.add_argument(
        "--lora_alpha",
        type=float,
        help="alpha: the update is scaled by alpha / rank. Default: the rank (scale 1).",
    )
    g.add_argument("--lora_dropout", type=float, default=0.0, help="Dropout on the adapters' input.")
    g.add_argument(
        "--save_format",
        choices=SAVE_FORMATS,
        default="diffusers",
        help=f"The exported LoRA file: diffusers' {LORA_WEIGHT_NAME}, or {KOHYA_WEIGHT_NAME} in kohya-ss sd-scripts' "
        "keys (lora_unet_..., lora_te_..., .alpha), the file AUTOMATIC1111 and ComfyUI load, instead. Either opens "
        "with pipe.load_lora_weights(folder); checkpoints stay in diffusers' format. Default: diffusers.",
    )
    return parser


def check_lora_args(args: argparse.Namespace) -> None:
    if args.rank < 1:
        raise ValueError(f"--rank must be a positive integer, got {args.rank}")
    if args.lora_alpha is not None and not args.lora_alpha > 0:
        raise ValueError(f"--lora_alpha must be > 0, got {args.lora_alpha}")
    if not 0.0 <= args.lora_dropout < 1.0:
        raise ValueError(f"--lora_dropout must lie in [0, 1), got {args.lora_dropout}")


def add_lora(
    model: torch.nn.Module, target_modules, rank: int, alpha: float | None = None, dropout: float = 0.0
) -> int:
    """Freeze `model` and give each of its `target_modules` a trainable adapter (of the model's dtype);
    return the number of trainable parameters."""
    if rank < 1:
        raise ValueError(f"the LoRA rank must be a positive integer, got {rank}")
    model.requires_grad_(False)
    model.add_adapter(
        LoraConfig(
            r=rank,
            lora_alpha=rank if alpha is None else alpha,
            lora_dropout=dropout,
            init_lora_weights="gaussian",  # A ~ N(0, 1/r^2), B = 0: the model starts as the base model
            target_modules=list(target_modules),
        )
    )
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def check_peft_compatible() -> None:
    """Fail in one line if the installed transformers refuses adapters from the installed peft.

    transformers checks peft's version only inside `add_adapter` (5.24 needs peft >= 0.22, and on 2026-12-01
    no peft 0.22 was published), so a fresh install of the newest pair broke text-encoder LoRA mid-setup.
    """
    required = getattr(transformers_peft, "MIN_PEFT_VERSION", None)  # absent from older transformers
    installed = version("peft")
    if required is not None and Version(installed) < Version(required):
        raise RuntimeError(
            f"transformers {version('transformers')} needs peft >= {required} for LoRA on the text encoder, "
            f"and peft {installed} is installed: install peft>={required}, or the tested versions "
            "(pip install -e . -c requirements/lock.txt, README \"Set-up\")"
        )


def add_lora_adapters(args, unet, text_encoder=None, dtype: torch.dtype = torch.float32) -> None:
    """The adapters the --rank/--lora_alpha/--lora_dropout flags ask for, on the UNet's attention projections
    and, when given, the text encoder's. The frozen UNet is held in `dtype` (the half dtype under mixed
    precision: half the memory), the adapters in fp32 (`cast_training_params`), so updates keep fp32
    precision. The text encoder stays fp32: its states set the dtype of a pipeline's latents."""
    if text_encoder is not None:
        check_peft_compatible()
    if unet.dtype != dtype:
        unet.to(dtype=dtype)
    add_lora(unet, UNET_TARGET_MODULES, args.rank, args.lora_alpha, args.lora_dropout)
    if text_encoder is not None:
        add_lora(text_encoder, TEXT_ENCODER_TARGET_MODULES, args.rank, args.lora_alpha, args.lora_dropout)
    cast_training_params([m for m in (unet, text_encoder) if m is not None], dtype=torch.float32)


def lora_layers(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapter weights of `model` (unwrapped) under diffusers' key names."""
    return convert_state_dict_to_diffusers(get_peft_model_state_dict(model, adapter_name=ADAPTER_NAME))


def save_lora(directory: str | Path, unet, text_encoder=None) -> Path:
    """Write the adapters of `unet` (and `text_encoder`) as directory/pytorch_lora_weights.safetensors in
    diffusers' format, with each adapter's LoraConfig (so alpha and rank come back on load). The file is
    written under a temporary name and renamed: a reader never sees half of it."""
    text = {}
    if text_encoder is not None:
        text = dict(
            text_encoder_lora_layers=lora_layers(text_encoder),
            text_encoder_lora_adapter_metadata=text_encoder.peft_config[ADAPTER_NAME].to_dict(),
        )
    path = Path(directory) / LORA_WEIGHT_NAME
    with atomic_path(path) as tmp:
        LatentDiffPipeline.save_lora_weights(
            tmp.parent,
            unet_lora_layers=lora_layers(unet),
            unet_lora_adapter_metadata=unet.peft_config[ADAPTER_NAME].to_dict(),
            **text,
            weight_name=tmp.name,
            safe_serialization=True,
        )
    return path


def kohya_lora_layers(model: torch.nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    """The adapter weights of `model` (unwrapped) under kohya-ss sd-scripts' key names (networks/lora.py): the
    prefix and the layer's module path joined with "_", then lora_down (A), lora_up (B) and the layer's alpha
    as a 0-d tensor, kohya's scale being alpha / rank as peft's is."""
    # kohya names the text encoder's layers as transformers 4's CLIPTextModel did; transformers 5 dropped the
    # text_model wrapper (diffusers' loader strips the prefix again)
    flattened = prefix == KOHYA_PREFIXES["text_encoder"] and not hasattr(model, "text_model")
    root = "text_model." if flattened else ""
    weights = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and ADAPTER_NAME in module.lora_A:
            kohya_name = f"{prefix}.{root}{name}".replace(".", "_")
            down, up = module.lora_A[ADAPTER_NAME].weight, module.lora_B[ADAPTER_NAME].weight
            weights[f"{kohya_name}.lora_down.weight"] = down.detach().cpu().contiguous()
            weights[f"{kohya_name}.lora_up.weight"] = up.detach().cpu().contiguous()
            weights[f"{kohya_name}.alpha"] = torch.tensor(float(module.lora_alpha[ADAPTER_NAME]))
    return weights


def save_lora_kohya(directory: str | Path, unet, text_encoder=None) -> Path:
    """Write the adapters of `unet` (and `text_encoder`) as directory/pytorch_lora_weights_kohya.safetensors in
    kohya-ss sd-scripts' format, with the metadata sd-scripts writes that AUTOMATIC1111 shows (ss_network_*).
    Written under a temporary name and renamed, as `save_lora` does."""
    weights = kohya_lora_layers(unet, KOHYA_PREFIXES["unet"])
    if text_encoder is not None:
        weights |= kohya_lora_layers(text_encoder, KOHYA_PREFIXES["text_encoder"])
    config = unet.peft_config[ADAPTER_NAME]
    metadata = {"ss_network_module": "networks.lora", "ss_network_dim": str(config.r),
                "ss_network_alpha": str(config.lora_alpha)}  # fmt: skip
    path = Path(directory) / KOHYA_WEIGHT_NAME
    with atomic_path(path) as tmp:
        save_file(weights, tmp, metadata=metadata)
    return path


def _module_of(key: str) -> str:
    """The layer a LoRA weight belongs to: the key up to its first "lora..." part."""
    parts = key.split(".")
    end = next((i for i, part in enumerate(parts) if part.startswith("lora")), len(parts))
    return ".".join(parts[:end])


def _layers_named(model, component: str, keys: list[str]) -> list[str]:
    """The layer each LoRA weight key of `component` (its prefix removed) names, as diffusers' loader resolves it:
    diffusers' old and new names (a converted kohya file has the old ones) become peft's, and the text_model
    prefix goes where transformers 5's CLIPTextModel has no such wrapper."""
    if component == "text_encoder":
        try:
            keys = list(convert_state_dict_to_peft(convert_state_dict_to_diffusers(dict.fromkeys(keys))))
        except ValueError:  # neither naming: no layer to find
            pass
        if not hasattr(model, "text_model"):
            keys = [k.removeprefix("text_model.") for k in keys]
    else:
        keys = list(convert_unet_state_dict_to_peft(dict.fromkeys(keys)))
    return [_module_of(k) for k in keys]


def unmatched_lora_keys(pipe, state_dict: dict) -> dict[str, str]:
    """The keys of a LoRA state dict (diffusers' format, as `pipe.lora_state_dict` gives it) that name no linear
    or conv layer of `pipe`, each with the layer it names."""
    by_component = {}
    for key in state_dict:
        component, _, rest = key.partition(".")
        by_component.setdefault(component, []).append(rest)
    unmatched = {}
    for component, keys in by_component.items():
        model = getattr(pipe, component, None) if component in COMPONENTS else None
        layers = set() if model is None else {
            name for name, module in model.named_modules()
            if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d, BaseTunerLayer))
        }  # fmt: skip
        for key, layer in zip(keys, _layers_named(model, component, keys), strict=True):
            if layer not in layers:
                unmatched[f"{component}.{key}"] = layer
    return unmatched


def lora_file(path: str | Path) -> Path:
    """The LoRA file at `path`: the file itself, or a folder's pytorch_lora_weights.safetensors (diffusers') or
    else its pytorch_lora_weights_kohya.safetensors."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"LoRA weights {str(path)!r}: no such file or folder")
    if path.is_file():
        return path
    found = [path / name for name in (LORA_WEIGHT_NAME, KOHYA_WEIGHT_NAME) if (path / name).is_file()]
    if not found:
        raise FileNotFoundError(f"{str(path)!r} holds no {LORA_WEIGHT_NAME} nor {KOHYA_WEIGHT_NAME}")
    return found[0]


def load_lora(pipe, path: str | Path, adapter_name: str | None = None) -> str:
    """Load LoRA weights (a folder holding pytorch_lora_weights.safetensors or pytorch_lora_weights_kohya.safetensors,
    or a file, in diffusers' or kohya's format) into `pipe`'s UNet and text encoder; return the adapter's name
    (for `pipe.set_adapters`).

    diffusers' `load_lora_weights` leaves out weights that match no layer with at most a logged warning (a
    LoRA made for another model then changes nothing, or part of what it should): here every weight must
    find its layer first, or nothing is loaded. A kohya file is checked as diffusers' loader converts it.
    """
    path = lora_file(path)
    state_dict, _ = pipe.lora_state_dict(str(path))
    unmatched = unmatched_lora_keys(pipe, state_dict)
    if unmatched:
        key, layer = next(iter(unmatched.items()))
        raise ValueError(
            f"{str(path)!r}: {len(unmatched)} of {len(state_dict)} LoRA weights match no layer of this pipeline, "
            f"e.g. {key!r} (no layer {layer!r} in its {key.partition('.')[0]!r}): the LoRA was trained on another model"
        )
    # diffusers' default names: default_0, default_1, ...
    adapter_name = adapter_name or get_adapter_name(pipe.unet)
    pipe.load_lora_weights(str(path), adapter_name=adapter_name)
    return adapter_name


def set_lora_state(model: torch.nn.Module, state_dict: dict, component: str) -> None:
    """Copy the `component` part of a LoRA state dict (diffusers' format) into `model`'s existing adapter, in
    place (an optimizer holding the parameters keeps them); every adapter weight must be given, none left over."""
    prefix = f"{component}."
    own = {k.removeprefix(prefix): v for k, v in state_dict.items() if k.startswith(prefix)}
    result = set_peft_model_state_dict(model, COMPONENTS[component](own), adapter_name=ADAPTER_NAME)
    missing = [k for k in result.missing_keys if "lora_" in k]
    if result.unexpected_keys or missing:
        raise ValueError(
            f"the {component} LoRA weights do not fit its adapters: {len(missing)} missing "
            f"(e.g. {missing[:1]}), {len(result.unexpected_keys)} unexpected (e.g. {result.unexpected_keys[:1]})"
        )


def register_lora_checkpointing(accelerator: Accelerator, unet, text_encoder=None) -> None:
    """Make `accelerator.save_state` write the adapters of `unet` (and `text_encoder`) as a LoRA file instead of
    the whole models, and `load_state` read them back: checkpoints stay small (the frozen weights come from
    the pretrained folder again), and a checkpoint folder opens with `pipe.load_lora_weights` too.

    Pass the models as they were before `accelerator.prepare`.
    """
    ours = {"unet": unet, "text_encoder": text_encoder}
    ours = {component: model for component, model in ours.items() if model is not None}

    def component_of(model) -> str | None:
        model = accelerator.unwrap_model(model)
        return next((component for component, own in ours.items() if own is model), None)

    def save_hook(models: list, weights: list, output_dir: str) -> None:
        if writes_output(accelerator):
            save_lora(output_dir, unet, text_encoder)
        for i in reversed(range(len(models))):  # accelerate saves what is left in `weights`
            if component_of(models[i]) is not None:
                weights.pop(i)

    def load_hook(models: list, input_dir: str) -> None:
        state_dict, _ = LatentDiffPipeline.lora_state_dict(input_dir, weight_name=LORA_WEIGHT_NAME)
        for i in reversed(range(len(models))):  # accelerate loads what is left in `models`
            component = component_of(models[i])
            if component is not None:
                set_lora_state(ours[component], state_dict, component)
                models.pop(i)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)
