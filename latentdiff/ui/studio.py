"""The web UI's model side, without gradio: one loaded pipeline, the sizes and LoRA files it takes, checked
settings, uploads decoded as training data is, and generation with previews, cancellation and PNG settings.

Every mistake a user can make raises ValueError (or FileNotFoundError) with a message for the page.
"""

from __future__ import annotations

import dataclasses
import itertools
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL.Image
import PIL.ImageOps
import torch

from latentdiff.cli import SCHEDULERS, make_scheduler
from latentdiff.data.transforms import exif_upright, open_image, to_rgb
from latentdiff.images import image_grid, read_settings, save_png, settings_text
from latentdiff.pipelines import LatentDiffImg2ImgPipeline, LatentDiffInpaintPipeline, LatentDiffPipeline
from latentdiff.presets import default_image_size, vae_scale_factor
from latentdiff.training.lora import KOHYA_WEIGHT_NAME, LORA_WEIGHT_NAME, load_lora, lora_file
from latentdiff.ui.preview import fit_latent_rgb

MODES = ("text-to-image", "img2img", "inpainting")
PIPELINES = {"text-to-image": LatentDiffPipeline, "img2img": LatentDiffImg2ImgPipeline,
             "inpainting": LatentDiffInpaintPipeline}
MAX_BATCH = 8
MAX_STEPS = 200
MAX_SEED = 2**32 - 1
MAX_UPLOAD_PIXELS = 4096 * 4096  # a larger upload is refused before it is decoded
PREVIEWS_PER_RUN = 10  # a latent preview every steps / 10 steps
EDITOR_SIDE = 512  # the inpainting canvas shows the source at most this large
PREVIEW_SIDE = 256


class Cancelled(Exception):
    """Raised inside the sampling loop when the user cancels; carries the step it stopped at."""


@dataclass
class Settings:
    """One generation request as the page sends it; ``Studio.check`` validates it."""

    mode: str = "text-to-image"
    prompt: str = ""
    negative_prompt: str = ""
    scheduler: str = "ddim"
    steps: int = 25
    guidance_scale: float = 7.5
    seed: int = 0
    width: int | None = None
    height: int | None = None
    batch: int = 1
    strength: float = 0.8
    lora: str = ""  # a LoRA file or folder; empty: none
    lora_scale: float = 1.0

    def png(self, seed: int, model: Path) -> dict:
        """The settings one image's PNG carries: the keys `latentdiff generate` writes, then the UI's own."""
        settings = {"prompt": self.prompt, "negative_prompt": self.negative_prompt, "seed": seed, "steps": self.steps,
                    "guidance_scale": self.guidance_scale, "scheduler": self.scheduler, "model": str(model),
                    "mode": self.mode, "width": self.width, "height": self.height}
        if self.mode != "text-to-image":
            settings["strength"] = self.strength
        if self.lora:
            settings.update(lora=self.lora, lora_scale=self.lora_scale)
        return settings


def image_sizes(vae, unet) -> list[int]:
    """The sides the page offers: multiples of the VAE's factor times the UNet's downsamplings (every skip
    connection then meets a latent of its own size), from half the model's own size to twice it."""
    step = vae_scale_factor(vae) * 2 ** (len(unet.config.block_out_channels) - 1)
    native = default_image_size(vae, unet)
    sizes = list(range(step, 2 * native + 1, step))
    sizes = [s for s in sizes if s >= native // 2] or [native]
    stride = max(1, len(sizes) // 16)  # at most ~16 choices, the model's own size among them
    return sorted({*sizes[::stride], native})


def load_upload(path: str | Path | None, what: str = "image", max_pixels: int = MAX_UPLOAD_PIXELS) -> PIL.Image.Image:
    """An uploaded image decoded with the checks training data gets (latentdiff.data.transforms: fully decoded,
    so a truncated file fails here; EXIF orientation applied; any mode to RGB on white), after its header
    says it is no larger than ``max_pixels``."""
    if not path:
        raise ValueError(f"no {what} given: upload one first")
    name = Path(path).name
    try:
        with PIL.Image.open(path) as header:
            width, height = header.size
        if width * height > max_pixels:
            raise ValueError(f"{name} is {width}x{height}: larger than the {max_pixels:,} pixels an upload may have")
        return to_rgb(exif_upright(open_image(path)))
    except (OSError, SyntaxError, PIL.Image.DecompressionBombError) as error:
        # PIL names the file by its path, here a temporary one of gradio's: the page says the name it was given
        raise ValueError(f"{name} is not a readable image ({str(error).replace(str(path), name)})") from None


def mask_from_layers(layers: list[np.ndarray]) -> PIL.Image.Image:
    """The inpainting mask (L, white where drawn) from the editor's RGBA layers: where any of them is painted."""
    drawn = [layer[..., 3] > 0 for layer in layers if layer is not None and layer.ndim == 3 and layer.shape[2] == 4]
    if not drawn or not np.any(drawn):
        raise ValueError("the mask is empty: paint over the part of the image to regenerate")
    return PIL.Image.fromarray(np.logical_or.reduce(drawn).astype(np.uint8) * 255, "L")


class Studio:
    """A pipeline folder loaded once, for every browser tab; generation holds a lock, so two runs never
    share the CPU (the gradio queue runs one at a time as well)."""

    def __init__(self, model_dir: str | Path, outdir: str | Path | None = None):
        self.model_dir = Path(model_dir).expanduser().resolve()
        self.pipe = LatentDiffPipeline.from_pretrained(self.model_dir)  # FileNotFoundError, ValueError: one line
        self.pipe.set_progress_bar_config(disable=True)
        vae, unet = self.pipe.vae, self.pipe.unet
        self.native_size = default_image_size(vae, unet)
        self.sizes = image_sizes(vae, unet)
        self.inpainting_model = unet.config.in_channels != vae.config.latent_channels
        # small images suffice for a per-pixel fit, and keep an SD-sized VAE's fit to a second or two
        self.preview = fit_latent_rgb(vae, side=min(self.native_size, 16 * vae_scale_factor(vae)))
        self.outdir = Path(outdir).expanduser() if outdir else Path(tempfile.mkdtemp(prefix="latentdiff-serve-"))
        self.outdir.mkdir(parents=True, exist_ok=True)
        self.lock = threading.Lock()
        self.adapters: dict[str, str] = {}  # a LoRA file -> its adapter name in the pipeline
        self.counter = itertools.count()

    def lora_choices(self) -> list[str]:
        """LoRA files beside the model folder: .safetensors files in its parent, and the parent's sub-folders
        (out/ldm/lora for out/ldm/pipeline) holding pytorch_lora_weights(_kohya).safetensors."""
        parent = self.model_dir.parent
        files = sorted(parent.glob("*.safetensors"))
        for folder in sorted(p for p in parent.iterdir() if p.is_dir() and p != self.model_dir):
            files += [folder / n for n in (LORA_WEIGHT_NAME, KOHYA_WEIGHT_NAME) if (folder / n).is_file()]
        return [str(f) for f in files]

    def check(self, settings: Settings) -> Settings:
        """``settings`` with each value checked against what this model and page allow (ValueError if not)."""
        s = dataclasses.replace(settings, prompt=(settings.prompt or "").strip(),
                                negative_prompt=(settings.negative_prompt or "").strip(), lora=(settings.lora or "").strip())
        if s.mode not in MODES:
            raise ValueError(f"mode {s.mode!r} is not one of {', '.join(MODES)}")
        if not s.prompt:
            raise ValueError("the prompt is empty: type what the image should show")
        if s.scheduler not in SCHEDULERS:
            raise ValueError(f"scheduler {s.scheduler!r} is not one of {', '.join(SCHEDULERS)}")
        s.width = self.native_size if s.width in (None, "") else s.width
        s.height = self.native_size if s.height in (None, "") else s.height
        for name, low, high in (("steps", 1, MAX_STEPS), ("seed", 0, MAX_SEED), ("batch", 1, MAX_BATCH),
                                ("width", 1, None), ("height", 1, None)):
            value = getattr(s, name)
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            if not isinstance(value, int) or isinstance(value, bool) or value < low or (high and value > high):
                raise ValueError(f"{name} {value!r} must be a whole number from {low}" + (f" to {high}" if high else ""))
            setattr(s, name, value)
        for name in ("width", "height"):
            if getattr(s, name) not in self.sizes:
                raise ValueError(f"{name} {getattr(s, name)} is not a size this model takes: one of "
                                 f"{', '.join(map(str, self.sizes))} px")
        for name in ("guidance_scale", "strength", "lora_scale"):
            try:
                setattr(s, name, float(getattr(s, name)))
            except (TypeError, ValueError):
                raise ValueError(f"{name.replace('_', ' ')} {getattr(s, name)!r} is not a number") from None
        if not 0 <= s.guidance_scale <= 30:
            raise ValueError(f"guidance {s.guidance_scale} must be from 0 to 30")
        if s.mode != "text-to-image" and not (0 < s.strength <= 1 and int(s.steps * s.strength) >= 1):
            raise ValueError(f"strength {s.strength} of {s.steps} steps must be in (0, 1] and leave at least one step")
        if self.inpainting_model and s.mode != "inpainting":
            raise ValueError("this is an inpainting model (its UNet takes a mask and the masked image): use the inpainting tab")
        if not -4 <= s.lora_scale <= 4:
            raise ValueError(f"LoRA scale {s.lora_scale} must be from -4 to 4")
        if s.lora:
            path = lora_file(Path(s.lora).expanduser())  # FileNotFoundError: no such file, or no LoRA in the folder
            if path.suffix != ".safetensors":  # another format may be a pickle, which can run code when loaded
                raise ValueError(f"{path.name}: a LoRA must be a .safetensors file")
            s.lora = str(path.resolve())
        return s

    def generate(
        self,
        settings: Settings,
        source: PIL.Image.Image | None = None,
        mask: PIL.Image.Image | None = None,
        stop: threading.Event | None = None,
        on_step: Callable[[int, int, list[PIL.Image.Image] | None], None] | None = None,
    ) -> list[Path]:
        """Generate ``settings.batch`` images, image i from seed + i (so each one's PNG settings reproduce it
        alone, and seed s at batch 1 is `latentdiff generate --seed s`); write them to ``outdir`` as PNGs
        with their settings. ``on_step(step, total, previews)`` follows each step, with latent previews every
        few steps (else None); ``stop`` set makes the run raise Cancelled at the next step."""
        s = self.check(settings)
        if s.mode != "text-to-image" and source is None:
            raise ValueError(f"{s.mode} needs a source image: upload one")
        if s.mode == "inpainting" and mask is None:
            raise ValueError("inpainting needs a mask: paint over the part of the image to regenerate")
        size = (s.width, s.height)
        total = s.steps if s.mode == "text-to-image" else int(s.steps * s.strength)
        every = max(1, total // PREVIEWS_PER_RUN)

        def callback(pipe, i, t, tensors):
            if stop is not None and stop.is_set():
                raise Cancelled(f"cancelled at step {i + 1} of {total}")
            if on_step is not None:
                step = i + 1
                on_step(step, total, self.preview.images(tensors["latents"], size) if step % every == 0 else None)
            return tensors

        with self.lock:
            if stop is not None and stop.is_set():  # cancelled while another run held the model
                raise Cancelled("cancelled before it started")
            self._use_lora(s.lora, s.lora_scale)
            pipe = PIPELINES[s.mode].from_pipe(self.pipe, scheduler=make_scheduler(s.scheduler, self.pipe.scheduler.config))
            kwargs = {}
            if s.mode != "text-to-image":
                kwargs.update(image=PIL.ImageOps.fit(source, size, PIL.Image.Resampling.LANCZOS), strength=s.strength)
            if s.mode == "inpainting":
                kwargs["mask_image"] = PIL.ImageOps.fit(mask.convert("L"), size, PIL.Image.Resampling.NEAREST)
            images = pipe(
                s.prompt,
                negative_prompt=s.negative_prompt or None,
                num_images_per_prompt=s.batch,
                num_inference_steps=s.steps,
                guidance_scale=s.guidance_scale,
                height=s.height,
                width=s.width,
                generator=[torch.Generator().manual_seed(s.seed + i) for i in range(s.batch)],
                callback_on_step_end=callback,
                **kwargs,
            ).images
        stamp = time.strftime("%Y%m%d-%H%M%S")
        paths = []
        for i, image in enumerate(images):
            path = self.outdir / f"{stamp}-{next(self.counter):04d}-seed{s.seed + i}.png"
            paths.append(save_png(image, path, settings_text(s.png(s.seed + i, self.model_dir))))
        return paths

    def _use_lora(self, path: str, scale: float) -> None:
        """Make ``path``'s adapter (loaded the first time, then kept) the only active one, at ``scale``; with
        no path, switch adapters off."""
        if not path:
            if self.adapters:
                self.pipe.disable_lora()
            return
        if path not in self.adapters:
            self.adapters[path] = load_lora(self.pipe, path)  # ValueError: a LoRA of another model
        self.pipe.enable_lora()
        self.pipe.set_adapters([self.adapters[path]], adapter_weights=[scale])

    def restore(self, path: str | Path | None) -> tuple[dict, list[str]]:
        """The page's values from a PNG's settings (``Settings`` field names), and what could not be restored."""
        image = load_upload(path, "PNG")
        with PIL.Image.open(path) as png:  # load_upload converts to RGB, which drops the text chunks
            settings = read_settings(png)
        if settings is None:
            raise ValueError(f"{Path(path).name} carries no latentdiff settings (a PNG from latentdiff generate or serve)")
        fields = {f.name for f in dataclasses.fields(Settings)}
        values = {key: value for key, value in settings.items() if key in fields}
        skipped = [key for key in settings if key not in fields and key != "model"]  # the model is the one loaded
        values.setdefault("width", image.width)
        values.setdefault("height", image.height)
        for key in ("width", "height"):
            if values[key] not in self.sizes:
                skipped.append(f"{key} {values.pop(key)} (this model takes {', '.join(map(str, self.sizes))})")
        if values.get("scheduler") not in (None, *SCHEDULERS):
            skipped.append(f"scheduler {values.pop('scheduler')!r}")
        return values, skipped

    def preview_grid(self, previews: list[PIL.Image.Image]) -> PIL.Image.Image:
        """One picture of a batch's previews (or images), scaled up by a whole factor to about PREVIEW_SIDE px
        for the page: a 32 px image would otherwise show as a dot."""
        picture = previews[0] if len(previews) == 1 else image_grid(previews)
        factor = max(1, PREVIEW_SIDE // max(picture.size))
        return picture.resize((picture.width * factor, picture.height * factor), PIL.Image.Resampling.NEAREST)

    def editor_background(self, image: PIL.Image.Image) -> PIL.Image.Image:
        """The source as the inpainting canvas shows it: at most EDITOR_SIDE on its long side, its aspect kept."""
        scale = min(1.0, EDITOR_SIDE / max(image.size))
        return image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))))
