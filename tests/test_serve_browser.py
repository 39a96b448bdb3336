"""The page of `finegrain serve` in a real browser: headless Chromium against a live server on 127.0.0.1.

Needs Debian's `chromium` and `chromium-driver` (.ci/run installs them); skipped without them, except in CI.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from PIL import Image

from finegrain.predict import Predictor
from finegrain.serve.app import ServeSettings, create_app
from finegrain.serve.server import serve_in_thread
from tests.test_predict import photo, write_checkpoint

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
if not (CHROMIUM and CHROMEDRIVER) and not os.environ.get("CI"):
    pytest.skip("headless browser tests need Debian's chromium and chromium-driver", allow_module_level=True)

from selenium import webdriver  # noqa: E402 - after the skip: the dev extra may be absent where chromium is
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support import expected_conditions as ec  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402


def chromium(width: int = 1200, height: int = 1000) -> webdriver.Chrome:
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     f"--window-size={width},{height}"):  # fmt: skip
        options.add_argument(argument)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    folder = tmp_path_factory.mktemp("browser")
    checkpoint = write_checkpoint(folder / "racnn.ckpt", method="racnn", attention="cbam")
    predictor = Predictor.from_checkpoint(checkpoint, device="cpu")
    url, stop = serve_in_thread(create_app(predictor, ServeSettings(checkpoint=str(checkpoint))))
    driver = chromium()
    try:
        yield driver, url, predictor, folder
    finally:
        driver.quit()
        stop()


def test_upload_a_photo_and_see_species_boxes_and_crops(site):
    driver, url, predictor, folder = site
    path = folder / "bird.jpg"
    Image.fromarray(photo(240, 180, seed=11)).save(path, quality=92)
    expected = predictor.predict(path, top_k=5)

    driver.get(url)
    wait = WebDriverWait(driver, 30)
    wait.until(ec.text_to_be_present_in_element((By.ID, "model-info"), "RACNN"))
    driver.find_element(By.ID, "files").send_keys(str(path))
    top1 = wait.until(ec.visibility_of_element_located((By.CSS_SELECTOR, ".card.done .top1")))
    assert top1.text == f"{expected[0]['label']} {100 * expected[0]['score']:.1f}%"
    card = driver.find_element(By.CSS_SELECTOR, ".card.done")
    labels = [e.text for e in card.find_elements(By.CSS_SELECTOR, ".bars .label")]
    assert labels == [p["label"] for p in expected]
    image = card.find_element(By.CSS_SELECTOR, ".photo img")
    assert driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth", image) > 0
    assert image.size["width"] > 100
    boxes = card.find_elements(By.CSS_SELECTOR, ".photo svg rect.box")
    assert len(boxes) == 2 and all(box.size["width"] > 0 for box in boxes)
    assert [t.text for t in card.find_elements(By.CSS_SELECTOR, ".photo .tag")] == ["scale2", "scale3"]
    tiles = card.find_elements(By.CSS_SELECTOR, ".tile canvas")
    assert len(tiles) >= 2  # the two zoom crops, then the CBAM maps
    # the crop tiles hold pixels of the photo, not a blank canvas
    painted = driver.execute_script(
        "const c = arguments[0].getContext('2d').getImageData(0, 0, arguments[0].width, arguments[0].height).data;"
        "let n = 0; for (let i = 3; i < c.length; i += 4) n += c[i] > 0; return n;", tiles[0])  # fmt: skip
    assert painted > 1000
    screenshots = os.environ.get("FINEGRAIN_SCREENSHOT_DIR")
    if screenshots:
        driver.save_screenshot(str(Path(screenshots) / "serve-test.png"))


def test_a_bad_file_shows_its_error_on_the_page(site):
    driver, url, _, folder = site
    path = folder / "holiday.jpg"
    path.write_text("not a photo at all")
    driver.get(url)
    driver.find_element(By.ID, "files").send_keys(str(path))
    alert = WebDriverWait(driver, 30).until(ec.visibility_of_element_located((By.CSS_SELECTOR, "[role=alert]")))
    assert "holiday.jpg: not an image" in alert.text


def test_the_page_fits_a_phone_and_the_drop_zone_takes_the_keyboard(site):
    driver, url, _, folder = site
    driver.set_window_size(390, 844)
    try:
        driver.get(url)
        path = folder / "phone.jpg"
        Image.fromarray(photo(300, 400, seed=12)).save(path)
        driver.find_element(By.ID, "files").send_keys(str(path))
        WebDriverWait(driver, 30).until(ec.visibility_of_element_located((By.CSS_SELECTOR, ".card.done .top1")))
        assert driver.execute_script("return document.documentElement.scrollWidth <= window.innerWidth")
        driver.find_element(By.TAG_NAME, "body").send_keys(Keys.TAB)
        assert driver.execute_script("return document.activeElement.id") == "drop"
    finally:
        driver.set_window_size(1200, 1000)
