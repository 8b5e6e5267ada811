"""The Gradio page of `latentdiff serve` over a Studio (latentdiff.ui.studio): generate, gallery, runs.

Only ``latentdiff serve`` and the UI's tests import this module: gradio is the optional ui extra.
"""

import logging
import os
import queue
import random
import sys
import threading

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # read by gradio at import and at launch: never phone home
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"

import gradio as gr  # noqa: E402
import pandas as pd  # noqa: E402  (gradio's own dependency: its plots take DataFrames)

from latentdiff.cli import SCHEDULERS  # noqa: E402
from latentdiff.data.transforms import open_image  # noqa: E402
from latentdiff.ui import runs  # noqa: E402
from latentdiff.ui.studio import (  # noqa: E402
    MAX_BATCH,
    MAX_SEED,
    MAX_STEPS,
    Cancelled,
    Settings,
    Studio,
    load_upload,
    mask_from_layers,
)

logger = logging.getLogger(__name__)
NO_LORA = "(none)"
GALLERY_SIZE = 48  # the newest images a browser tab's gallery keeps
USER_ERRORS = (ValueError, TypeError, FileNotFoundError)  # their message is for the user; anything else is a bug


def page_error(error: Exception) -> gr.Error:
    """The message the page shows for ``error``: a user's mistake in its own words; an unexpected failure by
    its type and message, its traceback in the server's log only (never in the page)."""
    if isinstance(error, gr.Error):
        return error
    if isinstance(error, USER_ERRORS):
        return gr.Error(str(error), print_exception=False)
    logger.error("the page got an unexpected error", exc_info=error)
    return gr.Error(f"{type(error).__name__}: {error} (the server's log has the details)", print_exception=False)


def shown(fn):
    """``fn`` with every exception turned into a message in the page."""
    def handler(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as error:
            raise page_error(error) from None
    handler.__name__ = fn.__name__
    return handler


def build_app(studio: Studio) -> gr.Blocks:
    """The page; queue and launch it with ``launch``."""
    stops: dict[str, threading.Event] = {}  # a browser tab's session -> the event that cancels its run
    lora_choices = [NO_LORA, *studio.lora_choices()]
    run_folders = [str(p) for p in runs.find_runs(studio.model_dir)]

    # gradio keeps every upload and shown image in its cache: a day's worth, checked hourly
    with gr.Blocks(title="latentdiff", analytics_enabled=False, delete_cache=(3600, 86400)) as demo:
        gallery_paths = gr.State([])
        run_grids = gr.State([])
        with gr.Tab("generate"):
            with gr.Row():
                with gr.Column(scale=2):
                    prompt = gr.Textbox(label="prompt", lines=2, elem_id="prompt")
                    negative_prompt = gr.Textbox(label="negative prompt", elem_id="negative-prompt")
                    with gr.Row():
                        scheduler = gr.Dropdown(list(SCHEDULERS), value="ddim", label="scheduler", elem_id="scheduler")
                        steps = gr.Slider(1, MAX_STEPS, value=25, step=1, label="steps", elem_id="steps")
                        guidance = gr.Slider(0, 20, value=7.5, step=0.5, label="guidance", elem_id="guidance")
                    with gr.Row(equal_height=True):
                        seed = gr.Number(value=0, precision=0, minimum=0, maximum=MAX_SEED, label="seed", elem_id="seed")
                        random_seed = gr.Button("random seed", elem_id="random-seed", scale=0, size="sm")
                    with gr.Row():
                        width = gr.Dropdown(studio.sizes, value=studio.native_size, label="width", elem_id="width")
                        height = gr.Dropdown(studio.sizes, value=studio.native_size, label="height", elem_id="height")
                        batch = gr.Slider(1, MAX_BATCH, value=1, step=1, label="batch", elem_id="batch")
                    with gr.Accordion("LoRA", open=len(lora_choices) > 1):
                        lora = gr.Dropdown(lora_choices, value=NO_LORA, label="LoRA beside the model", elem_id="lora")
                        lora_path = gr.Textbox(label="or a LoRA file or folder by path (wins over the list)",
                                               elem_id="lora-path")
                        lora_scale = gr.Slider(-2, 2, value=1, step=0.05, label="LoRA scale", elem_id="lora-scale")
                    restore = gr.File(label="drop a PNG here to restore its settings", file_types=[".png"],
                                      elem_id="restore", height=100)
                with gr.Column(scale=3):
                    with gr.Tabs():
                        with gr.Tab("text-to-image"):
                            generate_text = gr.Button("Generate", variant="primary", elem_id="generate-text-to-image")
                        with gr.Tab("img2img"):
                            with gr.Row():
                                source_file = gr.File(label="source image", file_types=["image"], height=100,
                                                      elem_id="img2img-source")
                                source_view = gr.Image(label="source", interactive=False, height=160)
                            img2img_strength = gr.Slider(0.05, 1, value=0.6, step=0.05, label="strength")
                            generate_img2img = gr.Button("Generate", variant="primary", elem_id="generate-img2img")
                        with gr.Tab("inpainting"):
                            inpaint_file = gr.File(label="source image", file_types=["image"], height=100,
                                                   elem_id="inpainting-source")
                            editor = gr.ImageEditor(
                                label="paint the part to regenerate", sources=(), type="numpy", layers=False,
                                transforms=(), height=320,  # a see-through brush: the mask is wherever it painted
                                brush=gr.Brush(colors=[("#ff0080", 0.5)], default_color=("#ff0080", 0.5),
                                               color_mode="fixed"),
                            )
                            inpaint_strength = gr.Slider(0.05, 1, value=1.0, step=0.05, label="strength")
                            generate_inpaint = gr.Button("Generate", variant="primary", elem_id="generate-inpainting")
                    with gr.Row():
                        status = gr.Markdown(elem_id="status")
                        cancel = gr.Button("Cancel", variant="stop", elem_id="cancel", scale=0)
                    with gr.Row():
                        preview = gr.Image(label="preview (latents mapped to colour)",
                                           interactive=False, format="png", height=300, elem_id="preview", scale=2)
                        gallery = gr.Gallery(label="gallery (each PNG carries its settings)", columns=3, format="png",
                                             elem_id="gallery", height="auto", preview=False, object_fit="contain",
                                             scale=3)
        with gr.Tab("runs"):
            with gr.Row(equal_height=True):
                run_folder = gr.Dropdown(run_folders, value=run_folders[0] if run_folders else None,
                                         allow_custom_value=True, label="training output folder", elem_id="run-folder")
                open_run = gr.Button("open", scale=0, elem_id="open-run")
            with gr.Row():
                with gr.Column():
                    grid_index = gr.Slider(0, 1, value=0, step=1, label="validation grid", elem_id="grid-index")
                    grid = gr.Image(label="validation grid", interactive=False, format="png", elem_id="grid")
                with gr.Column():
                    loss_plot = gr.LinePlot(x="step", y="value", color="curve", label="loss", elem_id="loss")
                    metrics = gr.JSON(label="metrics.json", visible=False)

        common = [prompt, negative_prompt, scheduler, steps, guidance, seed, width, height, batch, lora, lora_path,
                  lora_scale]

        def settings_of(mode: str, data: dict, strength) -> Settings:
            path = (data[lora_path] or "").strip()
            chosen = path or ("" if data[lora] in (None, NO_LORA) else data[lora])
            return Settings(mode=mode, prompt=data[prompt], negative_prompt=data[negative_prompt],
                            scheduler=data[scheduler], steps=data[steps], guidance_scale=data[guidance],
                            seed=data[seed], width=data[width], height=data[height], batch=data[batch],
                            strength=data[strength] if strength is not None else 1.0, lora=chosen,
                            lora_scale=data[lora_scale])

        def run(settings: Settings, source, mask, shown_paths, request: gr.Request, progress: gr.Progress):
            """Generate in a worker thread, yielding (preview, gallery, status, gallery paths) as steps end."""
            settings = studio.check(settings)
            stop = stops[request.session_hash] = threading.Event()
            events: queue.Queue = queue.Queue()
            outcome: dict = {}

            def work():
                try:
                    outcome["paths"] = studio.generate(settings, source, mask, stop, lambda *e: events.put(e))
                except BaseException as error:  # handed to the page's thread, which reports it
                    outcome["error"] = error
                finally:
                    events.put(None)

            worker = threading.Thread(target=work, daemon=True, name="latentdiff-generate")
            worker.start()
            try:
                progress(0, desc="starting")
                while (event := events.get()) is not None:
                    step, total, previews = event
                    progress((step, total), desc="denoising", unit="steps")
                    if previews is not None:
                        yield studio.preview_grid(previews), gr.update(), f"step {step} of {total}", gr.update()
            finally:
                stop.set()  # the page went away or cancelled: end the worker at its next step
                worker.join()
                if stops.get(request.session_hash) is stop:
                    del stops[request.session_hash]
            error = outcome.get("error")
            if isinstance(error, Cancelled):
                yield gr.update(), gr.update(), f"{error}", gr.update()
                return
            if error is not None:
                raise error
            paths = [str(p) for p in outcome["paths"]]
            kept = (paths + list(shown_paths or []))[:GALLERY_SIZE]
            image = studio.preview_grid([open_image(p) for p in paths])
            last = f"seed {settings.seed}" if settings.batch == 1 else f"seeds {settings.seed}-{settings.seed + settings.batch - 1}"
            yield image, kept, f"{len(paths)} image{'s' * (len(paths) > 1)}, {last}: saved in {studio.outdir}", kept

        def generator(mode: str, strength=None, upload=None, drawn=None):
            """The click handler of one tab's Generate button; its inputs come as a dict by component."""
            def handle(data: dict, request: gr.Request, progress=gr.Progress()):  # noqa: B008 (how gradio injects it)
                try:
                    settings = settings_of(mode, data, strength)
                    source = mask = None
                    if upload is not None:
                        source = load_upload(data[upload], "source image")
                    if drawn is not None:
                        mask = mask_from_layers((data[drawn] or {}).get("layers") or [])
                    yield from run(settings, source, mask, data[gallery_paths], request, progress)
                except Exception as error:
                    raise page_error(error) from None
            handle.__name__ = f"generate_{mode.replace('-', '_')}"
            return handle

        outputs = [preview, gallery, status, gallery_paths]
        inputs = {*common, gallery_paths}
        events = [
            generate_text.click(generator("text-to-image"), inputs, outputs, show_progress_on=[status],
                                concurrency_id="generate"),
            generate_img2img.click(generator("img2img", img2img_strength, source_file),
                                   inputs | {img2img_strength, source_file}, outputs, show_progress_on=[status],
                                   concurrency_id="generate"),
            generate_inpaint.click(generator("inpainting", inpaint_strength, inpaint_file, editor),
                                   inputs | {inpaint_strength, inpaint_file, editor}, outputs,
                                   show_progress_on=[status], concurrency_id="generate"),
        ]

        def stop_run(request: gr.Request):
            if request.session_hash in stops:
                stops[request.session_hash].set()

        cancel.click(stop_run, None, None, cancels=events, queue=False)
        random_seed.click(lambda: random.randint(0, MAX_SEED), None, seed, queue=False)

        @shown
        def restore_settings(path):
            values, skipped = studio.restore(path)
            note = f"restored the settings of {os.path.basename(path)}"
            if skipped:
                note += "; not restored: " + ", ".join(skipped)
            lora_value = values.get("lora")
            in_list = lora_value in lora_choices
            return (
                values.get("prompt", gr.update()), values.get("negative_prompt", gr.update()),
                values.get("scheduler", gr.update()), values.get("steps", gr.update()),
                values.get("guidance_scale", gr.update()), values.get("seed", gr.update()),
                values.get("width", gr.update()), values.get("height", gr.update()),
                lora_value if in_list else (NO_LORA if lora_value is None else gr.update()),
                "" if in_list or lora_value is None else lora_value,
                values.get("lora_scale", gr.update()), note,
            )

        restored = [prompt, negative_prompt, scheduler, steps, guidance, seed, width, height, lora, lora_path, lora_scale,
                    status]
        restore.upload(restore_settings, restore, restored, concurrency_limit=None)

        @shown
        def show_source(path):
            return load_upload(path, "source image")

        @shown
        def show_editor(path):
            background = studio.editor_background(load_upload(path, "source image"))
            return {"background": background, "layers": [], "composite": background}

        source_file.upload(show_source, source_file, source_view, concurrency_limit=None)
        inpaint_file.upload(show_editor, inpaint_file, editor, concurrency_limit=None)

        @shown
        def read_run(folder):
            if not folder:
                raise ValueError("choose a training output folder")
            found = runs.read_run(folder)
            grids = [str(p) for _, p in found.grids]
            last = max(len(grids) - 1, 0)
            plot = pd.DataFrame(found.rows(), columns=["step", "value", "curve"])
            return (grids, gr.update(maximum=max(last, 1), value=last, interactive=len(grids) > 1),
                    show_grid(grids, last), plot,
                    gr.update(value=found.metrics, visible=found.metrics is not None))

        def show_grid(grids, index):
            if not grids:
                return gr.update(value=None, label="validation grid: none in this folder")
            index = min(int(index), len(grids) - 1)
            step = int(runs.GRID_NAME.fullmatch(os.path.basename(grids[index])).group(1))
            return gr.update(value=open_image(grids[index]),
                             label=f"validation grid at step {step} ({index + 1} of {len(grids)})")

        open_run.click(read_run, run_folder, [run_grids, grid_index, grid, loss_plot, metrics],
                       concurrency_limit=None)
        grid_index.change(shown(show_grid), [run_grids, grid_index], grid,
                          concurrency_limit=None)
        if run_folders:
            demo.load(read_run, run_folder, [run_grids, grid_index, grid, loss_plot, metrics])
    return demo


def launch(demo: gr.Blocks, studio: Studio, host: str, port: int, auth: tuple[str, str] | None,
           max_upload_mb: float, block: bool = True) -> str:
    """Serve the page (one generation at a time: the queue; no share link, no analytics, uploads capped) and
    return its address; with ``block``, until interrupted."""
    demo.queue(default_concurrency_limit=1, max_size=32)
    demo.launch(
        server_name=host, server_port=port, auth=auth, share=False, inbrowser=False, show_error=False,
        max_file_size=int(max_upload_mb * 1e6), allowed_paths=[str(studio.outdir)], ssr_mode=False, mcp_server=False,
        pwa=False, enable_monitoring=False, prevent_thread_lock=True, quiet=True, footer_links=["api", "settings"],
    )  # quiet: gradio would suggest share=True, which this UI never sets
    if block:
        print(f"latentdiff serve: on {demo.local_url} (Ctrl+C stops it)", file=sys.stderr)
        demo.block_thread()
    return demo.local_url
