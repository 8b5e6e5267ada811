"""The README's picture of `latentdiff serve`: the page in Debian's headless chromium after a generation.

    python benchmarks/screenshot_serve.py out/demo/ldm/pipeline --out docs/serve.png

Starts the UI on a free loopback port in this process, types a prompt, sets the batch, clicks Generate,
waits for the gallery and saves a 1280x900 screenshot; prints how long each part took.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import tempfile
import time

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

from latentdiff.ui.app import build_app, launch
from latentdiff.ui.studio import Studio


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir")
    parser.add_argument("--out", default="docs/serve.png")
    parser.add_argument("--prompt", default="a small red circle in the top left")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=25)
    args = parser.parse_args()

    start = time.perf_counter()
    studio = Studio(args.model_dir, outdir=tempfile.mkdtemp(prefix="latentdiff-screenshot-"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    demo = build_app(studio)
    launch(demo, studio, "127.0.0.1", port, None, max_upload_mb=20, block=False)
    print(f"model loaded, preview fitted, server up: {time.perf_counter() - start:.1f} s")

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     "--window-size=1280,900", "--hide-scrollbars"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    try:
        start = time.perf_counter()
        driver.get(f"http://127.0.0.1:{port}/")
        prompt = WebDriverWait(driver, 60).until(lambda d: d.find_element(By.CSS_SELECTOR, "#prompt textarea"))
        print(f"page loaded: {time.perf_counter() - start:.1f} s")
        prompt.send_keys(args.prompt)
        for elem_id, value in (("batch", args.batch), ("steps", args.steps)):
            box = driver.find_element(By.CSS_SELECTOR, f"#{elem_id} input[type=number]")
            box.send_keys(Keys.CONTROL, "a")
            box.send_keys(str(value), Keys.ENTER)
        start = time.perf_counter()
        driver.find_element(By.CSS_SELECTOR, "#generate-text-to-image").click()
        WebDriverWait(driver, 300).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#gallery img")) >= args.batch)
        time.sleep(1)  # the last preview and the status line settle
        print(f"{args.batch} images generated: {time.perf_counter() - start:.1f} s")
        driver.save_screenshot(args.out)
        print(f"wrote {args.out}")
    finally:
        driver.quit()
        demo.close()


if __name__ == "__main__":
    main()
