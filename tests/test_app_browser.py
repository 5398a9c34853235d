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

from m3d_jax.app import viewer
from m3d_jax.data.phantoms import write_phantoms
from test_med2e3_tools import phantom_med2e3  # noqa: F401 (a fixture: the phantom-config Med-2E3 folder)

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


def _serve(folder: Path, ckpt: Path, examples: Path):
    """Runs `python -m m3d_jax.app` on `ckpt` with `examples` until the generator is closed; yields its URL."""
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "JAX_PLATFORMS": "cpu", "GRADIO_ANALYTICS_ENABLED": "False"}
    log = open(folder / "app.log", "w")
    process = subprocess.Popen([sys.executable, "-m", "m3d_jax.app", f"--ckpt={ckpt}", f"--port={port}",
                                f"--examples={examples}"], cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT)
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
def browser():
    """Debian's Chromium through Playwright, one for the module (Playwright's sync API runs one at a time)."""
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} not found: the browser tests need Debian's chromium (`apt-get install -y chromium`; "
                    ".ci/run installs it)")
    from playwright.sync_api import sync_playwright

    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def _browse(browser, url: str):
    """A page on `url` once the app's page is there; yields it, closed after."""
    page = browser.new_page(viewport={"width": 1440, "height": 1000})
    page.goto(url)
    page.wait_for_selector("#upload", timeout=60_000)
    yield page
    page.close()


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    """The app serving the scripted model, with a phantom set as its examples; stopped after the module."""
    from test_app import scripted_lamed

    folder = tmp_path_factory.mktemp("browser_app")
    scripted_lamed(folder / "model")
    write_phantoms(folder / "phantoms", num_cases=8, seed=0)
    yield from _serve(folder, folder / "model", folder / "phantoms")


@pytest.fixture(scope="module")
def page(browser, app_url):
    yield from _browse(browser, app_url)


@pytest.fixture(scope="module")
def med2e3_page(browser, phantom_med2e3, tmp_path_factory):  # noqa: F811 (the fixture imported above)
    """A page of the app serving test_med2e3_tools' random phantom-config Med-2E3, its phantoms as examples."""
    model_dir, phantoms = phantom_med2e3
    for url in _serve(tmp_path_factory.mktemp("browser_med2e3"), model_dir, phantoms):
        yield from _browse(browser, url)


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


def _axial_slice(page) -> int:
    return int(page.locator("#slider-axial input[type=number]").input_value())


def test_med2e3_plot_marks_the_top_slices_and_a_bar_click_moves_the_axial_viewer(med2e3_page):
    page = med2e3_page
    page.get_by_text("case_00").first.click()  # an example fills the upload box and the question
    page.wait_for_function("document.querySelector('#status')?.innerText.includes('Loaded')", timeout=60_000)
    page.locator("#ask").click()
    page.wait_for_function("document.querySelector('#details')?.innerText.includes('Top slices')",
                           timeout=ANSWER_TIMEOUT_MS)
    tops = [(int(j), int(first), int(last)) for j, first, last in
            re.findall(r"(\d+) \(input (\d+)–(\d+)\)", page.locator("#details").inner_text())]
    assert len(tops) == 5, page.locator("#details").inner_text()
    page.wait_for_function(f"document.querySelector('#slider-axial input[type=number]')?.value === "
                           f"'{(tops[0][1] + tops[0][2]) // 2}'", timeout=30_000)  # the answer shows the top slice
    plot = page.locator("#score-plot img")
    plot.wait_for(timeout=30_000)
    box = plot.bounding_box()
    j, first, last = tops[1]
    x = (viewer.PLOT_AXES[0] + viewer.PLOT_AXES[2] * (j + 0.5) / 32) * box["width"]
    plot.click(position={"x": x, "y": box["height"] * 0.5})
    page.wait_for_function(f"document.querySelector('#slider-axial input[type=number]')?.value === "
                           f"'{(first + last) // 2}'", timeout=30_000)
    assert _axial_slice(page) == (first + last) // 2
    page.screenshot(path=str(SCREENSHOTS / "5_med2e3_slice_scores.png"), full_page=True)
