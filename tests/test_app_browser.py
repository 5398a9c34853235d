"""The web app in a real browser: Chromium from Debian's packages (`apt-get install chromium`; .ci/run installs
it) driven by Playwright, against `python -m m3d_jax.app` serving the scripted tiny seg LaMed of test_app and a
small phantom set. Screenshots go to artifacts/app_screenshots/ (kept as CI artifacts)."""

from __future__ import annotations

import io
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from m3d_jax.data.phantoms import write_phantoms

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
SCREENSHOTS = ROOT / "artifacts" / "app_screenshots"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
START_TIMEOUT_S = 240
ANSWER_TIMEOUT_MS = 120_000


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    """The app serving the scripted model, with a phantom set as its examples; stopped after the module."""
    from test_app import scripted_lamed

    folder = tmp_path_factory.mktemp("browser_app")
    scripted_lamed(folder / "model")
    write_phantoms(folder / "phantoms", num_cases=8, seed=0)
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "JAX_PLATFORMS": "cpu", "GRADIO_ANALYTICS_ENABLED": "False"}
    log = open(folder / "app.log", "w")
    process = subprocess.Popen([sys.executable, "-m", "m3d_jax.app", f"--ckpt={folder / 'model'}", f"--port={port}",
                                f"--examples={folder / 'phantoms'}"], cwd=folder, env=env, stdout=log,
                               stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        if process.poll() is not None:
            pytest.fail(f"the app exited ({process.returncode}):\n{(folder / 'app.log').read_text()[-3000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                break
        except OSError:
            if time.monotonic() > deadline:
                process.kill()
                pytest.fail(f"the app did not serve within {START_TIMEOUT_S} s:\n{(folder / 'app.log').read_text()}")
            time.sleep(1)
    yield url
    process.terminate()
    process.wait(30)
    log.close()


@pytest.fixture(scope="module")
def page(app_url):
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} not found: the browser tests need Debian's chromium (`apt-get install -y chromium`; "
                    ".ci/run installs it)")
    from playwright.sync_api import sync_playwright

    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1440, "height": 1000})
        page.goto(app_url)
        page.wait_for_selector("#upload", timeout=60_000)
        yield page
        browser.close()


def _image_source(page, view: str) -> str:
    return page.locator(f"#view-{view} img").get_attribute("src") or ""


def _pixels(page, selector: str) -> np.ndarray:
    import matplotlib.image

    return (matplotlib.image.imread(io.BytesIO(page.locator(selector).screenshot()), format="png")[..., :3] * 255)


def test_an_example_phantom_loads_and_the_slider_moves_the_axial_view(page):
    page.get_by_text("case_0007").first.click()  # the phantom set's one held-out case
    page.wait_for_function("document.querySelector('#status')?.innerText.includes('Loaded')", timeout=60_000)
    assert "32 × 64 × 64 voxels" in page.locator("#status").inner_text()
    page.wait_for_function("document.querySelector('#slider-axial input[type=range]')?.max === '31'")
    page.wait_for_selector("#view-axial img")
    before = _image_source(page, "axial")
    number = page.locator("#slider-axial input[type=number]")
    number.fill("5")
    number.press("Enter")
    page.wait_for_function(f"document.querySelector('#view-axial img')?.src !== {before!r}", timeout=30_000)
    assert _image_source(page, "axial") != before
    page.screenshot(path=str(SCREENSHOTS / "1_phantom_loaded.png"), full_page=True)


def test_a_closed_question_gets_an_answer(page):
    from test_app import PLAIN_ANSWER, PLAIN_QUESTION

    page.locator("#question textarea").fill(PLAIN_QUESTION)
    page.locator("#ask").click()
    page.wait_for_function("document.querySelector('#details')?.innerText.includes('Answered in')",
                           timeout=ANSWER_TIMEOUT_MS)
    chat = page.locator("#chat").inner_text()
    assert PLAIN_QUESTION in chat and re.search(rf"\b{PLAIN_ANSWER}\b", chat), chat
    page.screenshot(path=str(SCREENSHOTS / "2_closed_answer.png"), full_page=True)


def test_a_seg_question_overlays_the_mask_and_offers_its_nifti(page):
    from test_app import SEG_ANSWER, SEG_QUESTION

    plain_axial = _pixels(page, "#view-axial img")
    page.locator("#question textarea").fill(SEG_QUESTION)
    page.locator("#ask").click()
    page.wait_for_function("document.querySelector('#details')?.innerText.includes('mL')", timeout=ANSWER_TIMEOUT_MS)
    assert SEG_ANSWER in page.locator("#chat").inner_text()
    page.wait_for_timeout(1500)  # the viewers redraw after the answer
    assert re.search(r"Mask: [\d,]+ voxels, [\d.]+ mL", page.locator("#details").inner_text())
    page.screenshot(path=str(SCREENSHOTS / "3_seg_mask.png"), full_page=True)
    assert re.search(r"mask_\d+\.nii\s*\.gz", page.locator("#mask-file").inner_text()), \
        page.locator("#mask-file").inner_text()
    masked = _pixels(page, "#view-axial img")
    orange = lambda rgb: ((rgb[..., 0] - rgb[..., 1] > 40) & (rgb[..., 0] - rgb[..., 2] > 40)).sum()  # noqa: E731
    assert orange(masked) > orange(plain_axial) + 100, "no mask overlay appeared on the axial view"
    page.screenshot(path=str(SCREENSHOTS / "3_seg_mask.png"), full_page=True)


def test_a_corrupt_upload_gets_a_message_not_a_trace(page, tmp_path):
    corrupt = tmp_path / "broken.nii.gz"
    corrupt.write_bytes(b"\x1f\x8b\x08\x00 this is not a gzip stream")
    page.locator("#upload input[type=file]").set_input_files(str(corrupt))
    page.wait_for_function("document.querySelector('#status')?.innerText.includes('broken.nii.gz')",
                           timeout=60_000)
    status = page.locator("#status").inner_text()
    assert "broken.nii.gz: cannot read NIfTI volume" in status and "Traceback" not in page.content()
    page.screenshot(path=str(SCREENSHOTS / "4_corrupt_upload.png"), full_page=True)
