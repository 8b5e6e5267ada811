"""latentdiff serve: the safety checks at the command line, the model side (sizes, settings, uploads, LoRA,
previews, cancel, one run at a time), the runs tab's reading, and the page itself in Debian's chromium."""

import json
import shutil
import socket
import subprocess
import sys
import threading
import urllib.request

import numpy as np
import PIL.Image
import pytest
import torch

from latentdiff import LatentDiffPipeline
from latentdiff.cli import main
from latentdiff.images import read_settings, save_png, settings_text
from latentdiff.ui import runs
from latentdiff.ui.preview import encode_decode, fit_latent_rgb, synthetic_images
from latentdiff.ui.serve import check_host, is_loopback, parse_auth
from latentdiff.ui.studio import Cancelled, Settings, Studio, load_upload, mask_from_layers

PROMPT = "a small red circle in the top left"


@pytest.fixture(scope="module")
def studio(tiny_pipeline_dir, tmp_path_factory):
    return Studio(tiny_pipeline_dir, outdir=tmp_path_factory.mktemp("serve-out"))


def pixels(path):
    return np.asarray(PIL.Image.open(path).convert("RGB"), dtype=np.int16)


# The command line: refused before anything is loaded --------------------------------------------------------

@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.7", "example.com"])
def test_a_host_others_can_reach_needs_auth(host, capsys):
    # a model folder that does not exist: the host is refused before the model (or gradio) is looked at
    assert main(["serve", "/no/such/model", "--host", host]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--host {host}" in err and "--auth USER:PASSWORD" in err
    check_host(host, ("user", "password"))  # with a login it is allowed


def test_loopback_hosts_need_no_auth():
    for host in ("127.0.0.1", "localhost", "::1", "127.0.0.2", "[::1]"):
        assert is_loopback(host)
        check_host(host, None)


def test_auth_is_user_colon_password(capsys):
    assert parse_auth("alice:s3cret") == ("alice", "s3cret")
    assert parse_auth("alice:pass:with:colons") == ("alice", "pass:with:colons")
    for bad in ("alice", ":s3cret", "alice:", ""):
        with pytest.raises(ValueError, match="USER:PASSWORD"):
            parse_auth(bad)
    assert main(["serve", "/no/such/model", "--auth", "alice"]) == 2
    assert "--auth must be USER:PASSWORD" in capsys.readouterr().err


def test_without_gradio_serve_says_how_to_install(tiny_pipeline_dir, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "gradio", None)  # import gradio now fails, as without the ui extra
    monkeypatch.delitem(sys.modules, "latentdiff.ui.app", raising=False)
    assert main(["serve", str(tiny_pipeline_dir)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and 'pip install -e ".[ui]"' in err


def test_latentdiff_and_its_command_import_no_gradio():
    code = "import sys, latentdiff, latentdiff.cli, latentdiff.ui.serve, latentdiff.ui.studio; print('gradio' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"


def test_serve_launches_with_its_flags(tiny_pipeline_dir, tmp_path, monkeypatch):
    app = pytest.importorskip("latentdiff.ui.app", reason="the web UI needs the ui extra")
    seen = {}

    def launch(demo, studio, host, port, auth, max_upload_mb):
        seen.update(host=host, port=port, auth=auth, max_upload_mb=max_upload_mb, outdir=studio.outdir)

    monkeypatch.setattr(app, "launch", launch)
    argv = ["serve", str(tiny_pipeline_dir), "--host", "0.0.0.0", "--port", "8123", "--auth", "ann:pass:word",
            "--outdir", str(tmp_path / "pngs"), "--max_upload_mb", "2.5"]
    assert main(argv) == 0
    assert seen == {"host": "0.0.0.0", "port": 8123, "auth": ("ann", "pass:word"), "max_upload_mb": 2.5,
                    "outdir": tmp_path / "pngs"}


def test_a_missing_model_is_one_line(capsys):
    pytest.importorskip("gradio")
    assert main(["serve", "/no/such/model"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not exist" in err


# The model side -------------------------------------------------------------------------------------------

def test_sizes_are_the_ones_the_model_takes(studio):
    assert studio.native_size == 16 and studio.sizes == [8, 12, 16, 20, 24, 28, 32]  # f=2, one UNet downsampling
    with pytest.raises(ValueError, match="width 18 is not a size this model takes: one of 8, 12"):
        studio.check(Settings(prompt=PROMPT, width=18))


@pytest.mark.parametrize("change, message", [
    ({"prompt": "  "}, "the prompt is empty"),
    ({"steps": 0}, "steps 0 must be a whole number from 1 to 200"),
    ({"seed": -1}, "seed -1 must be"),
    ({"batch": 99}, "batch 99 must be"),
    ({"scheduler": "plms"}, "scheduler 'plms' is not one of ddim"),
    ({"guidance_scale": None}, "guidance scale None is not a number"),
    ({"mode": "img2img", "strength": 0.01, "steps": 10}, "leave at least one step"),
    ({"lora": "/no/such/lora"}, "no such file or folder"),
])
def test_bad_values_are_refused_with_a_message(studio, change, message):
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        studio.check(Settings(**{"prompt": PROMPT, **change}))


def test_generated_pngs_carry_the_cli_settings_and_restore_them(studio, tiny_pipeline_dir, tmp_path):
    settings = Settings(prompt=PROMPT, negative_prompt="blurry", scheduler="euler", steps=3, guidance_scale=5.0,
                        seed=7, width=20, height=12)
    (path,) = studio.generate(settings)
    png = PIL.Image.open(path)
    assert png.size == (20, 12)
    written = read_settings(png)
    assert written == {"prompt": PROMPT, "negative_prompt": "blurry", "seed": 7, "steps": 3, "guidance_scale": 5.0,
                       "scheduler": "euler", "model": str(tiny_pipeline_dir.resolve()), "mode": "text-to-image",
                       "width": 20, "height": 12}
    values, skipped = studio.restore(path)
    assert skipped == [] and Settings(**values) == settings
    (again,) = studio.generate(Settings(**values))
    assert np.array_equal(pixels(again), pixels(path))  # restored settings make the same image

    # a PNG from latentdiff generate restores too; its size comes from the image
    cli_png = tmp_path / "cli.png"
    assert main(["generate", str(tiny_pipeline_dir), PROMPT, "--steps", "2", "--seed", "3", "--out", str(cli_png)]) == 0
    values, skipped = studio.restore(cli_png)
    assert values["seed"] == 3 and values["steps"] == 2 and (values["width"], values["height"]) == (16, 16)
    assert skipped == []

    plain = tmp_path / "plain.png"
    PIL.Image.new("RGB", (16, 16)).save(plain)
    with pytest.raises(ValueError, match="carries no latentdiff settings"):
        studio.restore(plain)
    odd = save_png(PIL.Image.new("RGB", (40, 40)), tmp_path / "odd.png", settings_text({"prompt": "x", "sampler": "k"}))
    values, skipped = studio.restore(odd)
    assert values == {"prompt": "x"} and skipped[0] == "sampler" and skipped[1].startswith("width 40")


def test_a_seed_is_the_cli_image_and_a_batch_is_consecutive_seeds(studio, tiny_pipeline_dir, tmp_path):
    (one,) = studio.generate(Settings(prompt=PROMPT, steps=3, seed=11))
    cli_png = tmp_path / "cli.png"
    assert main(["generate", str(tiny_pipeline_dir), PROMPT, "--steps", "3", "--seed", "11", "--out", str(cli_png)]) == 0
    assert np.array_equal(pixels(one), pixels(cli_png))
    first, second = studio.generate(Settings(prompt=PROMPT, steps=3, seed=10, batch=2))
    assert read_settings(PIL.Image.open(second))["seed"] == 11
    assert np.abs(pixels(second) - pixels(one)).max() <= 1  # batched vs alone: float rounding at most
    assert np.abs(pixels(first) - pixels(one)).max() > 10


def test_img2img_and_inpainting(studio):
    source = PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (24, 40, 3), dtype=np.uint8))
    (img2img,) = studio.generate(Settings(mode="img2img", prompt=PROMPT, steps=4, strength=0.5), source=source)
    assert PIL.Image.open(img2img).size == (16, 16) and read_settings(PIL.Image.open(img2img))["strength"] == 0.5
    layer = np.zeros((24, 40, 4), np.uint8)
    layer[6:18, 10:30, 3] = 255  # painted in the middle
    mask = mask_from_layers([layer])
    (inpainted,) = studio.generate(Settings(mode="inpainting", prompt=PROMPT, steps=3, strength=1.0), source=source,
                                   mask=mask)
    assert read_settings(PIL.Image.open(inpainted))["mode"] == "inpainting"
    with pytest.raises(ValueError, match="the mask is empty"):
        mask_from_layers([np.zeros((24, 40, 4), np.uint8)])
    with pytest.raises(ValueError, match="needs a source image"):
        studio.generate(Settings(mode="img2img", prompt=PROMPT, steps=2))


def test_uploads_are_decoded_with_the_training_checks(tmp_path):
    good = tmp_path / "rgba.png"
    PIL.Image.new("RGBA", (8, 6), (255, 0, 0, 0)).save(good)
    image = load_upload(good)
    assert image.mode == "RGB" and image.getpixel((0, 0)) == (255, 255, 255)  # transparency on white, as in training
    truncated = tmp_path / "truncated.png"
    data = (tmp_path / "full.png")
    PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(data)
    truncated.write_bytes(data.read_bytes()[:-200])
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    for path in (truncated, text):
        with pytest.raises(ValueError, match=f"{path.name} is not a readable image"):
            load_upload(path)
    with pytest.raises(ValueError, match="larger than the 1,000 pixels an upload may have"):
        load_upload(data, max_pixels=1000)
    with pytest.raises(ValueError, match="no source image given"):
        load_upload(None, "source image")


def test_cancel_stops_at_the_next_step_and_frees_the_model(studio):
    stop = threading.Event()
    seen = []

    def on_step(step, total, previews):
        seen.append(step)
        if step == 2:
            stop.set()

    with pytest.raises(Cancelled, match="cancelled at step 3 of 6"):
        studio.generate(Settings(prompt=PROMPT, steps=6), stop=stop, on_step=on_step)
    assert seen == [1, 2]
    assert len(studio.generate(Settings(prompt=PROMPT, steps=1))) == 1  # the lock was released


def test_two_runs_never_share_the_cpu(studio):
    steps = []

    def run(seed):
        studio.generate(Settings(prompt=PROMPT, steps=4, seed=seed), on_step=lambda step, *_: steps.append(seed))

    threads = [threading.Thread(target=run, args=(seed,)) for seed in (1, 2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert steps in ([1] * 4 + [2] * 4, [2] * 4 + [1] * 4)  # one run's steps all before the other's


def test_loras_beside_the_model_with_a_scale(tiny_pipeline, tmp_path):
    from latentdiff.training.lora import UNET_TARGET_MODULES, add_lora, save_lora

    model_dir = tmp_path / "run" / "pipeline"
    tiny_pipeline.save_pretrained(model_dir)
    tuned = LatentDiffPipeline.from_pretrained(model_dir)
    add_lora(tuned.unet, UNET_TARGET_MODULES, rank=2)
    generator = torch.Generator().manual_seed(0)
    for name, param in tuned.unet.named_parameters():
        if "lora_B" in name:  # B starts at zero (no change): make the adapters do something
            param.data = torch.randn(param.shape, generator=generator) * 0.5
    lora = save_lora(tmp_path / "run" / "lora", tuned.unet)
    (tmp_path / "run" / "weights.bin").write_bytes(b"a pickle, perhaps")

    studio = Studio(model_dir, outdir=tmp_path / "out")
    assert studio.lora_choices() == [str(lora)]
    base, full, zero, off = (
        pixels(studio.generate(Settings(prompt=PROMPT, steps=3, lora=lora_path, lora_scale=scale))[0])
        for lora_path, scale in (("", 1.0), (str(lora), 1.0), (str(lora.parent), 0.0), ("", 1.0))
    )
    assert np.abs(full - base).max() > 10 and np.abs(zero - base).max() <= 1 and np.array_equal(off, base)
    with pytest.raises(ValueError, match="a LoRA must be a .safetensors file"):
        studio.check(Settings(prompt=PROMPT, lora=str(tmp_path / "run" / "weights.bin")))


def test_the_linear_preview_approximates_the_vae_decode():
    from latentdiff import vae_from_preset

    torch.manual_seed(0)
    vae = vae_from_preset("tiny")  # a random decoder barely depends on its latents: train it for a few steps
    images = synthetic_images(32, 16, seed=2)
    optimizer = torch.optim.Adam(vae.parameters(), 5e-3)
    for i in range(15):
        batch = images[i * 8 % 32 : i * 8 % 32 + 8]
        loss = (vae(batch).sample - batch).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    vae.eval()
    preview = fit_latent_rgb(vae, side=16)
    assert preview.weight.shape == (5, 3)  # 4 latent channels and a bias -> RGB
    latents, decoded = encode_decode(vae, synthetic_images(12, 16, seed=1))  # images the fit never saw
    error = (preview(latents) - decoded).pow(2).mean()
    mean_colour = (decoded.mean(dim=(0, 2, 3), keepdim=True) - decoded).pow(2).mean()
    channels_as_rgb = (latents[:, :3].clamp(-1, 1) - decoded).pow(2).mean()
    assert error < 0.5 * mean_colour and error < 0.5 * channels_as_rgb
    (image,) = preview.images(latents[:1], (16, 16))
    assert image.size == (16, 16) and image.mode == "RGB"


# The runs tab ---------------------------------------------------------------------------------------------

def fake_run(folder, tensorboard=True):
    (folder / "validation").mkdir(parents=True)
    (folder / "latentdiff_run.json").write_text(json.dumps({"kind": "ldm"}))
    for step in (20, 10, 100):
        PIL.Image.new("RGB", (8, 8), (step, 0, 0)).save(folder / "validation" / f"step-{step:06d}.png")
    (folder / "validation" / "loss.jsonl").write_text('{"step": 10, "loss": 0.5}\n{"step": 20, "loss": 0.25}\n')
    (folder / "metrics.json").write_text(json.dumps({"psnr": 30.5}))
    if tensorboard:
        from torch.utils.tensorboard import SummaryWriter

        with SummaryWriter(folder / "logs" / "ldm") as writer:
            for step in range(1, 61):
                writer.add_scalar("train/loss", 1.0 / step, step)
                writer.add_scalar("train/lr", 1e-4, step)
    return folder


def test_runs_read_grids_losses_and_metrics(tmp_path):
    run = runs.read_run(fake_run(tmp_path / "out" / "ldm"))
    assert [step for step, _ in run.grids] == [10, 20, 100]
    assert set(run.curves) == {"train/loss", "val/loss"}  # the loss curves, not the learning rate
    assert run.curves["train/loss"][0] == (1, 1.0) and len(run.curves["train/loss"]) == 60
    assert run.curves["val/loss"] == [(10, 0.5), (20, 0.25)]  # from validation/loss.jsonl
    assert run.metrics == {"psnr": 30.5}
    curves = {row["curve"] for row in run.rows()}
    assert curves == {"train/loss", "train/loss (smoothed)", "val/loss"}  # the long noisy curve gets its trend

    only_files = runs.read_run(fake_run(tmp_path / "out" / "vae", tensorboard=False))
    assert set(only_files.curves) == {"val/loss"}
    (tmp_path / "out" / "ldm" / "pipeline").mkdir()
    assert runs.find_runs(tmp_path / "out" / "ldm" / "pipeline") == [tmp_path / "out" / "ldm", tmp_path / "out" / "vae"]
    with pytest.raises(ValueError, match="not a training output folder"):
        runs.read_run(tmp_path / "out")
    (tmp_path / "out" / "vae" / "validation" / "loss.jsonl").write_text("{oops\n")
    with pytest.raises(ValueError, match="line 1 is not"):
        runs.read_run(tmp_path / "out" / "vae")


# The page -------------------------------------------------------------------------------------------------

def test_errors_reach_the_page_as_messages_not_tracebacks():
    gr = pytest.importorskip("gradio")
    from latentdiff.ui.app import page_error

    error = page_error(ValueError("width 18 is not a size this model takes"))
    assert isinstance(error, gr.Error) and error.message == "width 18 is not a size this model takes"
    error = page_error(RuntimeError("boom"))
    assert error.message == "RuntimeError: boom (the server's log has the details)"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def browser():
    """Debian's headless chromium through its chromedriver (root needs --no-sandbox)."""
    pytest.importorskip("gradio", reason="the web UI needs the ui extra: pip install -e '.[ui]'")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (the dev extra)")
    from selenium.webdriver.chrome.service import Service

    chromium, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    if not chromium or not driver_path:
        pytest.skip("Debian's chromium and chromium-driver are not installed (.ci/run installs them)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     "--window-size=1280,900"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


@pytest.fixture
def server(studio):
    from latentdiff.ui.app import build_app, launch

    port = free_port()
    demo = build_app(studio)
    launch(demo, studio, "127.0.0.1", port, None, max_upload_mb=0.5, block=False)
    yield f"http://127.0.0.1:{port}/"
    demo.close()


def test_the_page_generates_an_image_with_its_settings(browser, server, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    def gallery_images(count):
        def found(driver):
            images = driver.find_elements(By.CSS_SELECTOR, "#gallery img")
            return images if len(images) >= count else None
        return WebDriverWait(browser, 60).until(found)

    def toast_says(text):
        def said(driver):
            return any(text in toast.text for toast in driver.find_elements(By.CSS_SELECTOR, ".toast-body"))
        WebDriverWait(browser, 30).until(said, f"no message {text!r} in the page")

    def png_at(url, name):
        path = tmp_path / name
        path.write_bytes(urllib.request.urlopen(url, timeout=10).read())
        return path

    browser.get(server)
    prompt = WebDriverWait(browser, 60).until(lambda d: d.find_element(By.CSS_SELECTOR, "#prompt textarea"))
    prompt.send_keys(PROMPT)
    browser.find_element(By.CSS_SELECTOR, "#generate-text-to-image").click()
    first = png_at(gallery_images(1)[0].get_attribute("src"), "first.png")
    settings = read_settings(PIL.Image.open(first))
    assert settings["prompt"] == PROMPT and settings["seed"] == 0 and settings["scheduler"] == "ddim"
    assert settings["steps"] == 25 and (settings["width"], settings["height"]) == (16, 16)

    browser.find_element(By.CSS_SELECTOR, "#generate-text-to-image").click()
    second = png_at(gallery_images(2)[0].get_attribute("src"), "second.png")  # the newest comes first
    assert second.read_bytes() != b"" and np.array_equal(pixels(first), pixels(second))  # the same seed, the same image
    assert "1 image, seed 0" in browser.find_element(By.CSS_SELECTOR, "#status").text

    # a random seed; then dropping a PNG on the page restores its settings
    seed = browser.find_element(By.CSS_SELECTOR, "#seed input")
    browser.find_element(By.CSS_SELECTOR, "#random-seed").click()
    WebDriverWait(browser, 20).until(lambda d: seed.get_attribute("value") != "0")
    prompt.clear()
    prompt.send_keys("something else")
    browser.find_element(By.CSS_SELECTOR, "#restore input[type=file]").send_keys(str(first))
    WebDriverWait(browser, 30).until(lambda d: "restored the settings of first.png" in d.find_element(By.CSS_SELECTOR, "#status").text)
    assert prompt.get_attribute("value") == PROMPT and seed.get_attribute("value") == "0"

    # an upload over --max_upload_mb, then one that is no image: a message in the page each
    browser.find_element(By.XPATH, "//button[@role='tab' and text()='img2img']").click()
    big = tmp_path / "big.png"
    PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (512, 512, 3), dtype=np.uint8)).save(big)  # ~0.8 MB
    upload = WebDriverWait(browser, 20).until(lambda d: d.find_element(By.CSS_SELECTOR, "#img2img-source input[type=file]"))
    upload.send_keys(str(big))
    toast_says('exceed the maximum allowed size of 488.3 Kb: "big.png"')
    bad = tmp_path / "broken.png"
    bad.write_text("not an image")
    browser.find_element(By.CSS_SELECTOR, "#img2img-source input[type=file]").send_keys(str(bad))
    toast_says("broken.png is not a readable image (cannot identify image file 'broken.png')")
    assert "Traceback" not in browser.page_source
