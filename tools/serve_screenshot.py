"""The README's picture of `finegrain serve`: the page after dropping photos, in headless Chromium.

    python tools/serve_screenshot.py --checkpoint CKPT --out docs/img/serve.png PHOTO [PHOTO ...]

Use synthetic birds only: docs/ must hold nothing derived from the CUB photographs.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from pathlib import Path

from PIL import Image
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from finegrain.predict import Predictor
from finegrain.serve.app import ServeSettings, create_app
from finegrain.serve.server import serve_in_thread


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("photos", nargs="+", type=Path)
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=Path("docs/img/serve.png"))
    parser.add_argument("--width", type=int, default=1100)
    args = parser.parse_args()

    predictor = Predictor.from_checkpoint(args.checkpoint, device="cpu")
    url, stop = serve_in_thread(create_app(predictor, ServeSettings(checkpoint=str(args.checkpoint))))
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--hide-scrollbars",
                     f"--window-size={args.width},900"):  # fmt: skip
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    try:
        driver.get(url)
        # one at a time and in reverse, so that the cards stand in the order given (the newest is on top)
        for i, photo in enumerate(reversed(args.photos), start=1):
            driver.find_element(By.ID, "files").send_keys(str(photo.resolve()))
            WebDriverWait(driver, 120).until(lambda d, n=i: len(d.find_elements(By.CSS_SELECTOR, ".card.done")) == n)
        # the window's outer size includes what headless Chromium keeps for its frame: grow until all fits
        for _ in range(3):
            inner = driver.execute_script("return window.innerHeight")
            height = driver.execute_script("return document.documentElement.scrollHeight")
            if inner >= height:
                break
            driver.set_window_size(args.width, driver.get_window_size()["height"] + height - inner)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=args.out.parent, suffix=".png", delete=False) as partial:
            temporary = Path(partial.name)
        driver.save_screenshot(str(temporary))
        Image.open(temporary).save(temporary, optimize=True)
        temporary.chmod(0o644)
        os.replace(temporary, args.out)
        print(f"wrote {args.out}")
    finally:
        driver.quit()
        stop()


if __name__ == "__main__":
    main()
