"""`cotexnet app` in a real browser: Debian's Chromium, headless, driven by Selenium through chromium-driver.

Runs in the app's own virtualenv (scripts/test-app.sh sets up .venv-app and runs this file); elsewhere it
skips and says what is missing. A tiny model is trained here on the MNI152 demo data, the app is started
on a free loopback port with a token, and the page is used as a person would: open the demo case,
Segment, read the segment list and the concept table, save, and look at the slice view.
"""
from __future__ import annotations

import io
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("trame_slicer", reason="the web app's virtualenv is not in use: run scripts/test-app.sh")
pytest.importorskip("selenium", reason="selenium is not installed: run scripts/test-app.sh")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER),
                                reason="Chromium and its driver are absent: apt-get install chromium chromium-driver")

from selenium import webdriver  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TOKEN = "test-token-0123456789"
CASE = "cases/mni152_04_0000.nii.gz"  # the demo's held-out MNI152 case
#: Where screenshots go (scripts/test-app.sh keeps them for the README); a temporary folder otherwise.
SCREENSHOTS = os.environ.get("COTEXNET_APP_SCREENSHOTS")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    """The demo data with a tiny model trained on it; the root holds the test case, and a symlink out."""
    from cotexnet.demo import write_mni152_dataset
    from cotexnet.train import TrainOptions, train

    work = tmp_path_factory.mktemp("app")
    data = write_mni152_dataset(work / "data")
    model = train(TrainOptions(data=str(data), out=str(work / "run"), backbone="tiny", image_size=64, epochs=3,
                               batch_size=4, lr=3e-3, patience=3, device="cpu", show_progress=False))
    root = work / "root"
    (root / "cases").mkdir(parents=True)
    shutil.copy(data / "imagesTr" / "mni152_04_0000.nii.gz", root / CASE)
    outside = work / "outside"
    outside.mkdir()
    shutil.copy(data / "imagesTr" / "mni152_03_0000.nii.gz", outside / "secret.nii.gz")
    (root / "escape").symlink_to(outside, target_is_directory=True)
    return root, Path(model)


@pytest.fixture(scope="module")
def app(data_root):
    """The app as a user starts it, on a free loopback port, with a token."""
    root, model = data_root
    port = free_port()
    log = tempfile.TemporaryFile("w+")
    process = subprocess.Popen(
        [sys.executable, "-m", "cotexnet.cli", "app", "--data-root", str(root), "--model", str(model), "--port",
         str(port), "--token", TOKEN, "--device", "cpu", "--max-sessions", "8"],
        cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(REPO)})
    base = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(base, timeout=2)
        except urllib.error.HTTPError:
            break  # it answers (403 without the token)
        except OSError:
            assert process.poll() is None, "the app ended at start"
            time.sleep(0.2)
    yield {"url": base, "process": process, "root": root, "model": model}
    import psutil

    descendants = psutil.Process(process.pid).children(recursive=True)
    process.terminate()
    process.wait(30)
    log.seek(0)
    print(log.read()[-5000:])
    gone, alive = psutil.wait_procs(descendants, timeout=15)
    assert not alive, f"session processes left running after the app stopped: {alive}"


@pytest.fixture(scope="module")
def browsers():
    """Opens headless Chromium windows, each with a new profile (so each is its own browser session)."""
    opened = []

    def open_browser():
        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                         "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1600,1000",
                         f"--user-data-dir={tempfile.mkdtemp(prefix='cotexnet-chromium-')}"):
            options.add_argument(argument)
        driver = webdriver.Chrome(service=webdriver.ChromeService(CHROMEDRIVER), options=options)
        opened.append(driver)
        return driver

    yield open_browser
    for driver in opened:
        driver.quit()


def wait_for(condition, timeout=120.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def open_page(driver, url):
    driver.get(url + f"?token={TOKEN}")
    wait_for(lambda: driver.find_elements(By.ID, "cx-open"), 90, "the page")


def text(driver, element_id):
    return driver.find_element(By.ID, element_id).text


def set_state(driver, name, value):
    """Sets a trame state variable from the page, as a crafted page could (paths are checked on the server)."""
    driver.execute_script("window.trame.state.set(arguments[0], arguments[1])", name, value)


def open_volume(driver, relative):
    set_state(driver, "cx_volume", relative)
    time.sleep(0.3)
    driver.find_element(By.ID, "cx-open").click()


def slice_view_picture(driver) -> np.ndarray:
    """RGB pixels of the largest view on the page (the axial slice view of the layout)."""
    from PIL import Image

    views = [e for e in driver.find_elements(By.CSS_SELECTOR, "img, canvas, video") if e.size["width"] > 100]
    view = max(views, key=lambda e: e.size["width"] * e.size["height"])
    page = np.asarray(Image.open(io.BytesIO(driver.get_screenshot_as_png())).convert("RGB"))
    scale = page.shape[1] / driver.execute_script("return window.innerWidth")
    x, y = int(view.location["x"] * scale), int(view.location["y"] * scale)
    w, h = int(view.size["width"] * scale), int(view.size["height"] * scale)
    return page[y:y + h, x:x + w]


def pixels_of_color(picture: np.ndarray, color) -> int:
    """Pixels within 40 of a class colour in every channel (segment outlines are drawn in the pure colour)."""
    target = np.round(np.asarray(color) * 255)
    return int((np.abs(picture.astype(int) - target).max(axis=2) <= 40).sum())


def save_screenshot(driver, name, tmp_path):
    folder = Path(SCREENSHOTS) if SCREENSHOTS else tmp_path
    folder.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(folder / name))


def test_segment_the_demo_case_in_the_browser(app, browsers, tmp_path):
    """Open the MNI152 case, Segment, and find the model's classes in the segment list, the concept table
    (a row per class, first column the class), the saved .seg.nrrd and the pixels of the slice view."""
    from cotexnet.bundle import read_bundle_config
    from cotexnet.data import read_image, read_label_map

    config = read_bundle_config(app["model"])
    driver = browsers()
    open_page(driver, app["url"])
    open_volume(driver, CASE)
    wait_for(lambda: "Opened" in text(driver, "cx-message"), 60, "the volume to open")
    time.sleep(2)  # the views render the new volume
    before = slice_view_picture(driver)

    driver.find_element(By.ID, "cx-segment").click()
    clicked = time.perf_counter()
    rows = wait_for(lambda: driver.find_elements(By.CSS_SELECTOR, ".cx-concept-row"), 300, "the concept table")
    print(f"Segment click to concept table shown: {time.perf_counter() - clicked:.1f} s; "
          f"server: {text(driver, 'cx-message')}")
    assert text(driver, "cx-error") == ""
    assert [row.find_elements(By.TAG_NAME, "td")[0].text for row in rows] == list(config.classes)
    panel = driver.find_element(By.CSS_SELECTOR, ".v-navigation-drawer").text
    for name in config.classes:  # trame-slicer's segment list, below the concept table
        assert len(re.findall(re.escape(name), panel)) >= 2, f"{name!r} missing from the segment list"

    driver.find_element(By.ID, "cx-save").click()
    saved = app["root"] / "cases" / "mni152_04_0000.seg.nrrd"
    wait_for(saved.exists, 30, "the saved segmentation")
    labels = read_label_map(saved, reference=read_image(app["root"] / CASE), num_classes=config.num_classes)
    assert labels.shape == read_image(app["root"] / CASE).array.shape

    time.sleep(2)  # the views render the segments
    after = slice_view_picture(driver)
    save_screenshot(driver, "app-segmented.png", tmp_path)
    shown = [(name, color) for index, (name, color) in enumerate(zip(config.classes, config.colors), start=1)
             if (labels == index).mean() > 0.01]
    assert shown, "the model found no class in more than 1% of the volume"
    for name, color in shown:
        assert pixels_of_color(after, color) > 50 + 2 * pixels_of_color(before, color), \
            f"{name} ({color}) is not drawn in the slice view"


def test_cancel_stops_the_worker_and_leaves_the_scene_as_it_was(app, browsers):
    driver = browsers()
    open_page(driver, app["url"])
    open_volume(driver, CASE)
    wait_for(lambda: "Opened" in text(driver, "cx-message"), 60, "the volume to open")
    driver.find_element(By.ID, "cx-segment").click()
    wait_for(lambda: driver.find_element(By.ID, "cx-cancel").is_enabled(), 30, "Cancel to be enabled")
    driver.find_element(By.ID, "cx-cancel").click()
    wait_for(lambda: "Cancelled" in text(driver, "cx-message"), 30, "the cancellation")
    assert not driver.find_elements(By.CSS_SELECTOR, ".cx-concept-row")
    assert driver.find_element(By.ID, "cx-segment").is_enabled()  # ready for the next run (a new worker)


def test_traversal_paths_and_a_missing_token_are_refused(app, browsers):
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(app["url"], timeout=10)
    assert refused.value.code == 403 and "token" in refused.value.read().decode()
    with pytest.raises(urllib.error.HTTPError) as wrong:
        urllib.request.urlopen(app["url"] + "?token=wrong", timeout=10)
    assert wrong.value.code == 403

    driver = browsers()
    open_page(driver, app["url"])
    for path, reason in (("../outside/secret.nii.gz", "'..' is not allowed"),
                         (str(app["root"].parent / "outside" / "secret.nii.gz"), "expected a path relative"),
                         ("escape/secret.nii.gz", "resolves outside the data root")):
        open_volume(driver, path)
        wait_for(lambda: reason in text(driver, "cx-error"), 30, f"refusal of {path}")
        assert "Opened" not in text(driver, "cx-message")


def test_two_sessions_keep_separate_scenes(app, browsers):
    first, second = browsers(), browsers()
    open_page(first, app["url"])
    open_page(second, app["url"])
    open_volume(first, CASE)
    wait_for(lambda: "Opened" in text(first, "cx-message"), 60, "the first session's volume")
    time.sleep(1)
    assert text(second, "cx-message").startswith("Open a volume"), "the second session sees the first one's scene"
    assert not second.find_element(By.ID, "cx-segment").is_enabled()
    assert first.find_element(By.ID, "cx-segment").is_enabled()
    assert first.get_cookie("cotexnet_session")["value"] != second.get_cookie("cotexnet_session")["value"]
    assert first.get_cookie("cotexnet_session")["httpOnly"]
