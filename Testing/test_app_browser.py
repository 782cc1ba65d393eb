"""`cotexnet app` in a real browser: Debian's Chromium, headless, driven by Selenium through chromium-driver.

Runs in the app's own virtualenv (scripts/test-app.sh sets up .venv-app and runs this file); elsewhere it
skips and says what is missing. A tiny model is trained here on the MNI152 demo data, the app is started
on a free loopback port with a token, and the page is used as a person would: open the demo case,
Segment, read the segment list and the concept table, jump to a segment, paint and undo, upload, save,
look at the slice view, and train from the page.
"""
from __future__ import annotations

import io
import json
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
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TOKEN = "test-token-0123456789"
CASE = "cases/mni152_04_0000.nii.gz"  # the demo's held-out MNI152 case
SAVED = "cases/mni152_04_0000.seg.nrrd"  # where Save writes its segmentation
SECOND_CASE = "cases/mni152_03_0000.nii.gz"  # another MNI152 case, for training on several opened cases
DICOM_CASE = "cases/mni152_04_dicom"  # CASE written as a DICOM series (one file per slice)
#: Upload cap of the app under test, in MiB: the default of `cotexnet app`.
UPLOAD_LIMIT_MB = 512
#: Where screenshots go (scripts/test-app.sh keeps them for the README); a temporary folder otherwise.
SCREENSHOTS = os.environ.get("COTEXNET_APP_SCREENSHOTS")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def write_dicom_series(image_path: Path, folder: Path, number: int = 2, description: str = "MNI152 T1 test series",
                       shrink: int = 1) -> None:
    """Writes a volume as an MR DICOM series, one file per slice, with the geometry tags a reader sorts and
    places slices by (ImagePositionPatient, ImageOrientationPatient, PixelSpacing, SliceThickness). The
    intensities (0..1 in the demo's template) are stored as integers times 1000. ``number`` ends the series
    UID and starts the file names, so a folder can hold several series; ``shrink`` keeps every n-th voxel."""
    import SimpleITK as sitk

    image = sitk.ReadImage(str(image_path))
    if shrink > 1:
        image = sitk.Shrink(image, [shrink] * 3)
    stored = sitk.Cast(sitk.Round(image * 1000.0), sitk.sitkInt16)
    direction = np.reshape(image.GetDirection(), (3, 3))
    orientation = "\\".join(f"{v:.6f}" for v in (*direction[:, 0], *direction[:, 1]))
    study, series = "1.2.826.0.1.3680043.2.1125.1.1", f"1.2.826.0.1.3680043.2.1125.1.{number}"
    folder.mkdir(parents=True, exist_ok=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(stored.GetDepth()):
        slice_ = stored[:, :, k]
        position = image.TransformIndexToPhysicalPoint((0, 0, k))
        for tag, value in (("0008|0060", "MR"), ("0020|000d", study), ("0020|000e", series),
                           ("0008|0018", f"{series}.{k + 1}"), ("0020|0013", str(k + 1)),
                           ("0020|0032", "\\".join(f"{v:.6f}" for v in position)), ("0020|0037", orientation),
                           ("0018|0050", f"{image.GetSpacing()[2]:.6f}"), ("0010|0010", "MNI152^Template"),
                           ("0008|103e", description)):
            slice_.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"series{number}_slice_{k:03d}.dcm"))
        writer.Execute(slice_)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    """The demo data with a tiny model trained on it (20 epochs: enough to find both classes on the test
    case); the root holds two cases, the first also as a DICOM series, and a symlink out."""
    from cotexnet.demo import write_mni152_dataset
    from cotexnet.train import TrainOptions, train

    work = tmp_path_factory.mktemp("app")
    data = write_mni152_dataset(work / "data")
    model = train(TrainOptions(data=str(data), out=str(work / "run"), backbone="tiny", image_size=64, epochs=20,
                               batch_size=4, lr=3e-3, patience=20, device="cpu", show_progress=False))
    root = work / "root"
    (root / "cases").mkdir(parents=True)
    shutil.copy(data / "imagesTr" / "mni152_04_0000.nii.gz", root / CASE)
    shutil.copy(data / "imagesTr" / "mni152_03_0000.nii.gz", root / SECOND_CASE)
    write_dicom_series(root / CASE, root / DICOM_CASE)
    outside = work / "outside"
    outside.mkdir()
    shutil.copy(data / "imagesTr" / "mni152_03_0000.nii.gz", outside / "secret.nii.gz")
    (root / "escape").symlink_to(outside, target_is_directory=True)
    return root, Path(model)


@pytest.fixture(scope="module")
def app(data_root, tmp_path_factory):
    """The app as a user starts it, on a free loopback port, with a token (and a config folder of its own,
    where it keeps its recent models)."""
    root, model = data_root
    port = free_port()
    log = tempfile.TemporaryFile("w+")
    config = tmp_path_factory.mktemp("config")
    process = subprocess.Popen(
        [sys.executable, "-m", "cotexnet.cli", "app", "--data-root", str(root), "--model", str(model), "--port",
         str(port), "--token", TOKEN, "--device", "cpu", "--max-sessions", "8", "--idle-timeout", "15", "--upload-limit-mb",
         str(UPLOAD_LIMIT_MB)],
        cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONPATH": str(REPO), "XDG_CONFIG_HOME": str(config)})
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
    yield {"url": base, "process": process, "root": root, "model": model, "config": config}
    import psutil

    descendants = psutil.Process(process.pid).children(recursive=True)
    process.terminate()
    process.wait(30)
    log.seek(0)
    print(log.read()[-5000:])
    gone, alive = psutil.wait_procs(descendants, timeout=15)
    assert not alive, f"session processes left running after the app stopped: {alive}"


def open_chromium():
    """A headless Chromium window with a new profile (so it is its own browser session)."""
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                     "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1600,1000",
                     f"--user-data-dir={tempfile.mkdtemp(prefix='cotexnet-chromium-')}"):
        options.add_argument(argument)
    return webdriver.Chrome(service=webdriver.ChromeService(CHROMEDRIVER), options=options)


def window_opener():
    """(open a window, the windows opened so far)."""
    opened = []

    def open_browser():
        opened.append(open_chromium())
        return opened[-1]

    return open_browser, opened


@pytest.fixture
def browsers():
    """Opens browser windows for one test and closes them after it: the app ends a session whose page is
    closed after --idle-timeout, so the tests never reach --max-sessions."""
    open_browser, opened = window_opener()
    yield open_browser
    for driver in opened:
        driver.quit()


@pytest.fixture(scope="module")
def module_browsers():
    """Browser windows shared by the tests of one module (the segmented page)."""
    open_browser, opened = window_opener()
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


def view_pictures(driver) -> dict[str, np.ndarray]:
    """RGB pixels of each view as the page lays them out: the large axial slice view on the left, and on the
    right from the top the 3D, coronal and sagittal views."""
    from PIL import Image

    boxes = sorted({(e.location["x"], e.location["y"], e.size["width"], e.size["height"])
                    for e in driver.find_elements(By.CSS_SELECTOR, ".remote-controlled-area img") if e.size["width"] > 100})
    assert len(boxes) == 4, f"expected four views, found {boxes}"
    page = np.asarray(Image.open(io.BytesIO(driver.get_screenshot_as_png())).convert("RGB"))
    scale = page.shape[1] / driver.execute_script("return window.innerWidth")
    pictures = {}
    for name, (x, y, w, h) in zip(("axial", "3d", "coronal", "sagittal"), [boxes[0], *sorted(boxes[1:], key=lambda b: b[1])]):
        x, y, w, h = (int(v * scale) for v in (x, y, w, h))
        pictures[name] = page[y:y + h, x:x + w]
    return pictures


def pixels_of_color(picture: np.ndarray, color) -> int:
    """Pixels within 40 of a class colour in every channel (segment outlines are drawn in the pure colour)."""
    target = np.round(np.asarray(color) * 255)
    return int((np.abs(picture.astype(int) - target).max(axis=2) <= 40).sum())


def pixels_of_hue(picture: np.ndarray, color) -> int:
    """Lit pixels whose chromaticity (r, g, b over their sum) is within 0.06 of a class colour's: a shaded
    surface keeps its colour's chromaticity while lighting scales its brightness; grey scale has none."""
    rgb = picture.astype(float)
    total = rgb.sum(axis=2, keepdims=True)
    target = np.asarray(color, float) / sum(color)
    close = np.abs(rgb / np.maximum(total, 1) - target).max(axis=2) <= 0.06
    return int((close & (total[..., 0] > 60)).sum())


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
    before = view_pictures(driver)

    # Every phase the progress bar is sent, recorded in the page as it arrives.
    driver.execute_script("window.cxPhases = []; window.trame.state.watch(['cx_phase'], (p) => window.cxPhases.push(p))")
    driver.find_element(By.ID, "cx-segment").click()
    clicked = time.perf_counter()
    rows = wait_for(lambda: driver.find_elements(By.CSS_SELECTOR, ".cx-concept-row"), 300, "the concept table")
    phases = driver.execute_script("return window.cxPhases")
    print(f"phases seen: {phases}")
    assert {"Starting the worker", "Loading the model"} & set(phases), phases
    assert phases[-2:] == ["Drawing the segments", ""], phases  # named while the result is drawn, then done
    # (Slices N of M shows between polls of 0.1 s: this small case may go through them between two;
    # cotexnet_app.jobs.next_phase is tested in test_app_files.py.)
    print(f"Segment click to concept table shown: {time.perf_counter() - clicked:.1f} s; "
          f"server: {text(driver, 'cx-message')}")
    assert text(driver, "cx-error") == ""
    assert [row.find_elements(By.TAG_NAME, "td")[0].text for row in rows] == list(config.classes)
    panel = driver.find_element(By.CSS_SELECTOR, ".v-navigation-drawer").text
    for name in config.classes:  # trame-slicer's segment list, below the concept table
        assert len(re.findall(re.escape(name), panel)) >= 2, f"{name!r} missing from the segment list"

    driver.find_element(By.ID, "cx-save").click()
    saved = app["root"] / SAVED
    wait_for(saved.exists, 30, "the saved segmentation")
    labels = read_label_map(saved, reference=read_image(app["root"] / CASE), num_classes=config.num_classes)
    assert labels.shape == read_image(app["root"] / CASE).array.shape

    time.sleep(2)  # the views render the segments
    after = view_pictures(driver)
    save_screenshot(driver, "app-segmented.png", tmp_path)
    shown = [(name, color) for index, (name, color) in enumerate(zip(config.classes, config.colors), start=1)
             if (labels == index).mean() > 0.01]
    assert [name for name, _ in shown] == list(config.classes), "the test model misses a class on the test case"
    for name, color in shown:
        assert pixels_of_color(after["axial"], color) > 50 + 2 * pixels_of_color(before["axial"], color), \
            f"{name} ({color}) is not drawn in the axial view"
    # Grey matter encloses white matter, so only its (opaque) surface can be seen in the 3D view.
    outer = config.colors[config.classes.index("grey matter")]
    assert pixels_of_hue(after["3d"], outer) > 200 + 2 * pixels_of_hue(before["3d"], outer), \
        f"grey matter ({outer}) has no surface in the 3D view"
    assert state(driver, "SegmentEditorState__segment_display__SegmentDisplayState__show_3d") is True  # the editor's "Show 3D" is on


def test_cancel_stops_the_worker_and_leaves_the_scene_as_it_was(app, browsers):
    # A model no session has used: its shared worker starts now (seconds), so Cancel comes before the result.
    copy = app["root"] / "models" / "cancel-copy"
    if not copy.exists():
        shutil.copytree(app["model"], copy)
    driver = browsers()
    open_page(driver, app["url"])
    open_volume(driver, CASE)
    wait_for(lambda: "Opened" in text(driver, "cx-message"), 60, "the volume to open")
    set_state(driver, "cx_model", "models/cancel-copy")
    time.sleep(0.3)
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


def state(driver, name):
    return driver.execute_script("return window.trame.state.get(arguments[0])", name)


@pytest.fixture(scope="module")
def segmented(app, module_browsers):
    """A page with the demo case opened and segmented, shared by the tests of what follows a segmentation."""
    driver = module_browsers()
    open_page(driver, app["url"])
    open_volume(driver, CASE)
    wait_for(lambda: "Opened" in text(driver, "cx-message"), 60, "the volume to open")
    driver.find_element(By.ID, "cx-segment").click()
    wait_for(lambda: driver.find_elements(By.CSS_SELECTOR, ".cx-concept-row"), 300, "the concept table")
    return driver


def slice_positions(driver) -> tuple:
    """Where the red, green and yellow slice views are (trame-slicer's slice sliders, in mm)."""
    return tuple(round(float(state(driver, f"{view}__SliderState__value")), 2) for view in ("Red", "Green", "Yellow"))


def test_a_concept_row_click_jumps_the_slice_views_to_its_segment(segmented):
    """Each row centres the slice views on its own segment (CoTexNetSegmentLogic.showConceptRow, which jumps
    all slices to the segment's centre) and makes it the active segment of the editor."""
    driver = segmented
    segments = {s["name"]: s["segment_id"] for s in state(driver, "SegmentEditorState__segment_list__SegmentListState__segments")}
    rows = driver.find_elements(By.CSS_SELECTOR, ".cx-concept-row")
    positions = []
    for index in (len(rows) - 1, 0, len(rows) - 1):
        row = driver.find_elements(By.CSS_SELECTOR, ".cx-concept-row")[index]
        name = row.find_elements(By.TAG_NAME, "td")[0].text
        before = slice_positions(driver)
        row.click()
        wait_for(lambda: state(driver, "SegmentEditorState__segment_list__SegmentListState__active_segment_id")
                 == segments[name], 30, f"{name} to become the active segment")
        time.sleep(0.5)
        positions.append(slice_positions(driver))
        print(f"row {name}: slices {before} -> {positions[-1]}")
    assert "background" in driver.find_elements(By.CSS_SELECTOR, ".cx-concept-row")[-1].get_attribute("style"), \
        "the chosen row is not highlighted"
    assert "background" not in driver.find_elements(By.CSS_SELECTOR, ".cx-concept-row")[0].get_attribute("style")
    assert positions[0] != positions[1], "two segments with different centres gave the same slice positions"
    assert positions[2] == positions[0], "the same row jumped to another place the second time"


def saved_counts(app, driver, num_classes, case=CASE) -> list[int]:
    """Saves the segmentation from the page and counts each class's voxels in the written file."""
    from cotexnet.data import read_image, read_label_map

    saved = app["root"] / case.replace(".nii.gz", ".seg.nrrd")
    before = saved.stat().st_mtime_ns if saved.exists() else None
    driver.find_element(By.ID, "cx-save").click()
    wait_for(lambda: saved.exists() and saved.stat().st_mtime_ns != before and "Saved" in text(driver, "cx-message"),
             30, "the saved segmentation")
    labels = read_label_map(saved, reference=read_image(app["root"] / case), num_classes=num_classes)
    return [int((labels == index).sum()) for index in range(1, num_classes + 1)]


def add_segment_button(driver):
    """trame-slicer's Add segment button (an mdi-plus icon in the panel)."""
    buttons = driver.find_elements(By.XPATH, "//button[.//i[contains(@class, 'mdi-plus')]]")
    add = [button for button in buttons if button.is_displayed()]
    assert add, "trame-slicer's Add segment button"
    return add[0]


def editor_button(driver, icon):
    """trame-slicer's effect and undo buttons are icons (mdi-brush, mdi-eraser, mdi-undo); the toolbar beside
    the views holds the last of each."""
    buttons = driver.find_elements(By.XPATH, f"//button[.//i[contains(@class, '{icon}')]]")
    return [button for button in buttons if button.is_displayed()][-1]


def choose_effect(driver, icon, effect):
    editor_button(driver, icon).click()
    wait_for(lambda: (state(driver, "SegmentEditorState__active_effect_name") or "").endswith(effect), 30,
             f"the {effect} effect")


def main_view(driver):
    """The page's largest view, the axial slice view on the left."""
    views = driver.find_elements(By.CSS_SELECTOR, ".remote-controlled-area img")
    return max(views, key=lambda e: e.size["width"] * e.size["height"])


def drag_across_the_main_view(driver, offset=(-40, 0), steps=12):
    actions = ActionChains(driver).move_to_element_with_offset(main_view(driver), *offset).click_and_hold()
    for _ in range(steps):
        actions.move_by_offset(6, 2)
    actions.release().perform()


def make_active(driver, row: int) -> None:
    """Clicks a concept-table row: its class becomes the segment the effects edit."""
    driver.find_elements(By.CSS_SELECTOR, ".cx-concept-row")[row].click()
    time.sleep(1)


def undo_back_through(app, driver, num_classes, *expected_counts) -> None:
    """Clicks Undo once per expected state and checks the saved voxel counts after each."""
    for expected in expected_counts:
        editor_button(driver, "mdi-undo").click()
        time.sleep(1)
        assert saved_counts(app, driver, num_classes) == expected


def test_paint_and_erase_change_the_segment_and_undo_brings_it_back(app, segmented):
    """A brush stroke in the axial view adds voxels to the active segment, an eraser stroke over it removes
    some, and Undo takes each back in turn: counted in the .seg.nrrd that Save writes."""
    from cotexnet.bundle import read_bundle_config

    driver = segmented
    num_classes = read_bundle_config(app["model"]).num_classes
    make_active(driver, 0)
    original = saved_counts(app, driver, num_classes)

    choose_effect(driver, "mdi-brush", "Paint")
    drag_across_the_main_view(driver)
    wait_for(lambda: state(driver, "SegmentEditorState__can_undo"), 30, "the stroke to be undoable")
    painted = saved_counts(app, driver, num_classes)
    assert painted[0] > original[0], f"painting added no voxel to the first segment: {original} -> {painted}"

    choose_effect(driver, "mdi-eraser", "Erase")
    drag_across_the_main_view(driver)  # over the painted stroke
    time.sleep(1)
    erased = saved_counts(app, driver, num_classes)
    assert erased[0] < painted[0], f"erasing removed no voxel of the first segment: {painted} -> {erased}"

    undo_back_through(app, driver, num_classes, painted, original)
    choose_effect(driver, "mdi-cursor-default", "NoTool")  # back to no tool for the tests that follow


def lasso_across_the_main_view(driver, size=80):
    """A closed square stroke around the centre of the axial view (the scissors' free-form shape)."""
    actions = ActionChains(driver).move_to_element_with_offset(main_view(driver), -size // 2, -size // 2).click_and_hold()
    for dx, dy in ((1, 0), (0, 1), (-1, 0), (0, -1)):
        for _ in range(8):
            actions.move_by_offset(dx * size // 8, dy * size // 8)
    actions.release().perform()


def largest_island(mask: np.ndarray) -> int:
    """Voxels of the largest 6-connected component: what Islands' "Keep largest" keeps. trame-slicer 2.0's
    segmentation_effect_islands.py (get_island_labelmap, lines 281-284) labels islands with vtkITKIslandMath
    and SetFullyConnected(False), i.e. face neighbours only, as scipy's default structure does."""
    from scipy import ndimage

    components, count = ndimage.label(mask)
    return int(np.bincount(components.ravel())[1:].max()) if count else 0


def test_scissors_and_islands_edit_the_segment_and_undo_brings_it_back(app, segmented):
    """Scissors (free-form, erase inside, through all slices) removes voxels of the active segment only;
    Islands "Keep largest" leaves exactly the active segment's largest 6-connected component; Undo takes
    each back."""
    from cotexnet.bundle import read_bundle_config
    from cotexnet.data import read_image, read_label_map

    driver = segmented
    num_classes = read_bundle_config(app["model"]).num_classes
    make_active(driver, 0)
    original = saved_counts(app, driver, num_classes)

    choose_effect(driver, "mdi-content-cut", "Scissors")
    lasso_across_the_main_view(driver)
    wait_for(lambda: state(driver, "SegmentEditorState__can_undo"), 30, "the cut to be undoable")
    time.sleep(1)
    cut = saved_counts(app, driver, num_classes)
    assert cut[0] < original[0] and cut[1:] == original[1:], f"scissors: {original} -> {cut}"

    make_active(driver, 1)  # white matter, in pieces (the cortex ribbon of grey matter is one island)
    choose_effect(driver, "mdi-scatter-plot", "Islands")
    apply = [b for b in driver.find_elements(By.XPATH, "//button[normalize-space(.)='Apply']") if b.is_displayed()]
    assert len(apply) == 1, "the Islands panel's Apply button"
    apply[0].click()
    time.sleep(2)
    kept = saved_counts(app, driver, num_classes)
    assert kept[0] == cut[0] and kept[1] < cut[1], f"islands: {cut} -> {kept}"
    labels = read_label_map(app["root"] / SAVED, reference=read_image(app["root"] / CASE), num_classes=num_classes)
    assert largest_island(labels == 2) == kept[1], "Keep largest kept more than one island"

    undo_back_through(app, driver, num_classes, cut, original)
    choose_effect(driver, "mdi-cursor-default", "NoTool")


def test_training_from_the_page_plots_each_epoch_and_hands_over_only_a_model_that_is_not_worse(app, segmented,
                                                                                                browsers):
    """Two epochs on the opened cases from the current model: loss and per-class Dice get a point per epoch
    while it runs; the run becomes the chosen model only if it is not worse on the held-out case (or at the
    user's click), is then listed among the recent models, and segments."""
    from cotexnet.bundle import read_bundle_config

    driver = segmented
    classes = read_bundle_config(app["model"]).classes
    open_volume(driver, SECOND_CASE)  # a second case, segmented too: the run trains on both opened cases
    wait_for(lambda: f"Opened {SECOND_CASE}" in text(driver, "cx-message"), 60, "the second case to open")
    assert not driver.find_elements(By.CSS_SELECTOR, ".cx-concept-row"), "the first case's table is still shown"
    driver.find_element(By.ID, "cx-segment").click()
    wait_for(lambda: "Segmented" in text(driver, "cx-message") and not state(driver, "cx_busy"), 300, "the second case")
    assert [case["value"] for case in state(driver, "cx_cases")] == [CASE, SECOND_CASE]
    cases = driver.find_element(By.ID, "cx-case").find_element(By.XPATH, "ancestor::div[contains(@class, 'v-select')][1]")
    cases.find_element(By.CSS_SELECTOR, ".v-field").click()  # the opened-cases list puts the first case back
    wait_for(lambda: [item for item in driver.find_elements(By.CSS_SELECTOR, ".v-overlay .v-list-item")
                      if item.is_displayed() and CASE in item.text], 10, "the opened-cases menu")[0].click()
    wait_for(lambda: f"Opened {CASE}" in text(driver, "cx-message"), 30, "the first case to come back")
    assert len(wait_for(lambda: driver.find_elements(By.CSS_SELECTOR, ".cx-concept-row"), 30, "its table")) == len(classes)
    set_state(driver, "cx_epochs", 2)
    time.sleep(0.3)
    driver.find_element(By.ID, "cx-train").click()
    assert "on 2 cases" in wait_for(lambda: text(driver, "cx-train-message"), 30, "the training message")
    started = time.perf_counter()
    wait_for(lambda: driver.find_elements(By.CSS_SELECTOR, ".cx-point") or text(driver, "cx-error"), 300,
             "the first point of the training curves")
    print(f"training start to first plot point: {time.perf_counter() - started:.1f} s")
    assert text(driver, "cx-error") == ""
    assert driver.find_element(By.ID, "cx-stop").is_enabled()
    wait_for(lambda: not state(driver, "cx_training"), 300, "the training to end")
    assert text(driver, "cx-error") == ""
    charts = state(driver, "cx_charts")
    assert [chart["title"] for chart in charts] == ["loss", "validation Dice"]
    assert [len(series["dots"]) for series in charts[0]["series"]] == [2]
    assert [series["name"] for series in charts[1]["series"]] == list(classes)
    assert all(len(series["dots"]) == 2 for series in charts[1]["series"])
    assert len(driver.find_elements(By.CSS_SELECTOR, ".cx-point")) == 2 * (1 + len(classes))
    legends = [legend.text.split("\n") for legend in driver.find_elements(By.CSS_SELECTOR, ".cx-legend")]
    assert legends == [["loss"], list(classes)], legends

    # The run becomes the current model only if its Dice on the held-out case is not below the current
    # model's on the same case; the page shows both, and one click switches anyway.
    message = wait_for(lambda: "Mean Dice" in text(driver, "cx-train-message") and text(driver, "cx-train-message"),
                       300, "the comparison on the held-out case")
    print(message)
    new, current = (float(v) for v in re.search(r"new ([0-9.]+), current ([0-9.]+)", message).groups())
    assert "on 1 held-out case(s)" in message
    run = next(choice["value"] for choice in state(driver, "cx_models") if choice["value"].startswith("runs/2-cases-"))
    if new < current:
        assert state(driver, "cx_model") != run and "it is worse, so the current model stays" in message
        driver.find_element(By.ID, "cx-use-candidate").click()
        wait_for(lambda: state(driver, "cx_model") == run, 30, "the switch to the new model")
    else:
        assert state(driver, "cx_model") == run and "the current model is now" in message
    last = json.loads((app["root"] / run / "last" / "training.json").read_text())  # best/ is the best epoch's
    assert last["epochs_run"] == 2 and Path(last["options"]["init_from"]) == app["model"]
    assert sorted(case for cases in last["split"].values() for case in cases) == ["case_000", "case_001"]
    # The run says which files its cases are (the export names them case_000, case_001).
    assert json.loads((app["root"] / run / "sources.json").read_text()) == {"case_000": CASE, "case_001": SECOND_CASE}
    assert (app["root"] / run / "best" / "config.json").is_file()
    chooser = driver.find_element(By.ID, "cx-model").find_element(By.XPATH, "ancestor::div[contains(@class, 'v-select')][1]")
    assert chooser.find_element(By.CSS_SELECTOR, ".v-select__selection-text").text.startswith(run)
    recent = json.loads((app["config"] / "cotexnet" / "app-recent-models.json").read_text())["models"]
    assert recent[0] == str((app["root"] / run).resolve())
    # The recent list is shared, but a new session starts with the --model, not with another session's run.
    other = browsers()
    open_page(other, app["url"])
    assert state(other, "cx_model") == str(app["model"].resolve())

    driver.find_element(By.ID, "cx-segment").click()
    time.sleep(1)
    if state(driver, "cx_question"):  # the case holds the model's unsaved result: Segment asks first
        answer(driver, proceed=True)
    wait_for(lambda: "Segmented" in text(driver, "cx-message") and not state(driver, "cx_busy"), 300,
             "a segmentation with the new model")
    assert text(driver, "cx-error") == ""


def test_a_run_stopped_before_one_epoch_does_not_become_the_current_model(app, segmented):
    """Stop writes the run's stop file (CoTexNetTrainLogic.requestStop); the process saves and exits long
    before its 50 epochs, and a run that did not finish one epoch leaves the current model as it was."""
    driver = segmented
    before = state(driver, "cx_model")
    set_state(driver, "cx_epochs", 50)
    time.sleep(0.3)
    driver.find_element(By.ID, "cx-train").click()
    wait_for(lambda: state(driver, "cx_training"), 60, "the training to start")
    driver.find_element(By.ID, "cx-stop").click()
    wait_for(lambda: not state(driver, "cx_training"), 300, "the training to stop")
    assert text(driver, "cx-error") == ""
    message = text(driver, "cx-train-message")
    assert message.startswith("Stopped") and "stopped before one full epoch, so the current model stays" in message
    assert state(driver, "cx_model") == before
    run = max((app["root"] / "runs").iterdir(), key=lambda folder: folder.stat().st_mtime_ns)
    assert (run / "stop-training").exists()


def test_a_dicom_folder_opens_segments_and_saves_beside_the_folder(app, browsers):
    """The DICOM series of the test case (integers, intensities times 1000) opens with the NIfTI's geometry,
    segments like the NIfTI does (the engine's own prediction on the NIfTI file), and Save writes
    ``<folder>.seg.nrrd`` beside the series, not into it."""
    from cotexnet import CoTexNet
    from cotexnet.data import read_image, read_label_map
    from cotexnet.data.image import as_geometry, read_segmentation_file
    from cotexnet.infer import predict_volume

    driver = browsers()
    open_page(driver, app["url"])
    assert DICOM_CASE in state(driver, "cx_volumes")
    open_volume(driver, DICOM_CASE)
    wait_for(lambda: f"Opened {DICOM_CASE}" in text(driver, "cx-message") or text(driver, "cx-error"), 60, "the series")
    assert text(driver, "cx-error") == ""
    set_state(driver, "cx_model", str(app["model"].resolve()))  # the --model (runs trained earlier are listed first)
    time.sleep(0.3)
    driver.find_element(By.ID, "cx-segment").click()
    wait_for(lambda: driver.find_elements(By.CSS_SELECTOR, ".cx-concept-row") or text(driver, "cx-error"), 300,
             "the concept table")
    assert text(driver, "cx-error") == ""
    driver.find_element(By.ID, "cx-save").click()
    saved = app["root"] / f"{DICOM_CASE}.seg.nrrd"
    wait_for(saved.exists, 30, "the saved segmentation")
    assert not list((app["root"] / DICOM_CASE).glob("*.nrrd"))

    nifti = read_image(app["root"] / CASE)
    assert read_segmentation_file(saved)[1].same_grid(as_geometry(nifti)), "the series did not keep the geometry"
    model = CoTexNet.from_pretrained(app["model"])
    labels = read_label_map(saved, reference=nifti, num_classes=model.config.num_classes)
    expected = predict_volume(model, nifti, device="cpu").labels
    for index, name in enumerate(model.config.classes, start=1):
        a, b = labels == index, expected == index
        dice = 2 * (a & b).sum() / (a.sum() + b.sum())
        assert dice > 0.99, f"{name}: Dice {dice:.3f} between the DICOM and NIfTI segmentations"


def test_a_folder_of_two_dicom_series_lists_them_and_opens_the_chosen_one(app, browsers, tmp_path):
    """A DICOM folder holding the test case twice, whole and shrunk by 2, opens neither silently: a dialog
    lists both series with their sizes; choosing the smaller opens it (the saved segmentation has its grid),
    and its segmentation is saved as ``<folder>-<series UID>.seg.nrrd``, apart from the other series'."""
    from cotexnet.data import read_image
    from cotexnet.data.image import read_segmentation_file

    folder = "cases/two_series"
    write_dicom_series(app["root"] / CASE, app["root"] / folder, number=2, description="Whole T1")
    write_dicom_series(app["root"] / CASE, app["root"] / folder, number=3, description="Shrunk T1", shrink=2)
    whole = read_image(app["root"] / CASE).shape  # (slices, rows, columns)
    small = tuple(n // 2 for n in whole)  # SimpleITK.Shrink drops a last odd voxel
    driver = browsers()
    open_page(driver, app["url"])
    series = "1.2.826.0.1.3680043.2.1125.1.{}"

    def choose(row: int) -> Path:
        """Opens the folder, chooses a series from the dialog, adds a segment and saves: the saved file."""
        open_volume(driver, folder)
        rows = wait_for(lambda: driver.find_elements(By.CSS_SELECTOR, ".cx-series-row"), 60, "the list of series")
        assert state(driver, "cx_opened") in ("", f"{folder}#series={series.format(3)}")  # nothing new opened yet
        rows[row].click()
        wait_for(lambda: "Opened" in text(driver, "cx-message") or text(driver, "cx-error"), 60, "the chosen series")
        assert text(driver, "cx-error") == ""
        assert not driver.find_elements(By.CSS_SELECTOR, ".cx-series-row")
        number = 2 + row
        assert state(driver, "cx_opened") == f"{folder}#series={series.format(number)}"
        add_segment_button(driver).click()  # Save needs a segment
        time.sleep(1)
        driver.find_element(By.ID, "cx-save").click()
        saved = app["root"] / f"{folder}-{series.format(number)}.seg.nrrd"
        wait_for(lambda: saved.exists() or text(driver, "cx-error"), 30, "the saved segmentation")
        assert text(driver, "cx-error") == ""
        return saved

    open_volume(driver, folder)
    rows = wait_for(lambda: driver.find_elements(By.CSS_SELECTOR, ".cx-series-row"), 60, "the list of series")
    time.sleep(0.5)  # the dialog's transition
    save_screenshot(driver, "app-dicom-series.png", tmp_path)
    listed = [[cell.text for cell in row.find_elements(By.TAG_NAME, "td")] for row in rows]
    print(f"series listed: {listed}")
    size = "{1} x {2} x {0}"  # rows x columns x slices
    assert listed == [["Whole T1", "MR", size.format(*whole), str(whole[0])],
                      ["Shrunk T1", "MR", size.format(*small), str(small[0])]]
    assert f"{folder} holds 2 DICOM series" in driver.find_element(By.ID, "cx-series").text
    driver.find_element(By.ID, "cx-series-cancel").click()  # Cancel opens nothing
    wait_for(lambda: not driver.find_elements(By.CSS_SELECTOR, ".cx-series-row"), 10, "the dialog to close")
    assert state(driver, "cx_opened") == ""

    saved_small = choose(1)
    assert read_segmentation_file(saved_small)[1].shape == small, "the opened grid is not the chosen series'"
    small_bytes = saved_small.read_bytes()
    saved_whole = choose(0)  # the other series of the folder: a file of its own
    assert read_segmentation_file(saved_whole)[1].shape == whole
    assert saved_small.read_bytes() == small_bytes
    assert not (app["root"] / f"{folder}.seg.nrrd").exists()
    assert [case["value"] for case in state(driver, "cx_cases")] == [
        f"{folder}#series={series.format(3)}", f"{folder}#series={series.format(2)}"]

    open_volume(driver, DICOM_CASE)  # a folder of one series opens at once, as before
    wait_for(lambda: f"Opened {DICOM_CASE}" in text(driver, "cx-message") or text(driver, "cx-error"), 60, "the series")
    assert text(driver, "cx-error") == "" and not driver.find_elements(By.CSS_SELECTOR, ".cx-series-row")


def upload_file(driver, path: Path) -> None:
    driver.find_element(By.CSS_SELECTOR, "#cotexnet-panel input[type=file]").send_keys(str(path))


def write_large_volume(path: Path, megabytes: int) -> None:
    """An uncompressed float32 NIfTI of about ``megabytes`` MB: a smooth blob in noise."""
    import SimpleITK as sitk

    side = 256
    depth = -(-megabytes * 10**6 // (4 * side * side))  # rounded up
    z, y, x = np.ogrid[:depth, :side, :side]
    blob = np.exp(-(((x - side / 2) / 60.0) ** 2 + ((y - side / 2) / 60.0) ** 2 + ((z - depth / 2) / 40.0) ** 2))
    array = (blob + 0.05 * np.random.default_rng(0).standard_normal((depth, side, side))).astype(np.float32)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((0.8, 0.8, 1.0))
    sitk.WriteImage(image, str(path), useCompression=False)


def test_a_100_mb_upload_opens_and_one_over_the_cap_is_refused_before_sending(app, browsers, tmp_path):
    """Uploads go in chunks under every websocket limit, with progress: a 100 MB volume arrives whole and
    opens. A 600 MB file (over the 512 MiB cap) is refused in the page before any byte is sent, and the
    session lives on with its opened case."""
    driver = browsers()
    open_page(driver, app["url"])
    large = tmp_path / "large volume.nii"
    write_large_volume(large, 100)
    assert large.stat().st_size > 100 * 10**6
    started = time.perf_counter()
    upload_file(driver, large)
    wait_for(lambda: state(driver, "cx_uploading") or text(driver, "cx-error"), 30, "the upload to start")
    progress = set()
    wait_for(lambda: progress.add(state(driver, "cx_upload_progress")) or "Opened" in text(driver, "cx-message")
             or text(driver, "cx-error"), 300, "the uploaded case to open")
    print(f"100 MB upload to opened: {time.perf_counter() - started:.1f} s; progress seen: {sorted(progress)}")
    assert text(driver, "cx-error") == ""
    assert text(driver, "cx-message") == "Opened uploads/large_volume.nii."
    assert len(progress - {0, 100}) >= 2, f"no progress shown between 0 and 100%: {sorted(progress)}"
    assert (app["root"] / "uploads" / "large_volume.nii").read_bytes() == large.read_bytes()
    assert not list((app["root"] / "uploads").glob(".upload-*")), "the upload's staging folder was left behind"

    over = tmp_path / "over the cap.nii"
    with open(over, "wb") as sparse:  # 600 MB on no disk space: the page refuses it from its size
        sparse.truncate(600 * 10**6)
    upload_file(driver, over)
    wait_for(lambda: "over the upload limit" in text(driver, "cx-error"), 30, "the refusal of an oversized upload")
    assert "nothing was sent" in text(driver, "cx-error")
    assert not state(driver, "cx_uploading")
    time.sleep(1)
    assert not list((app["root"] / "uploads").glob("over*"))
    assert [case["value"] for case in state(driver, "cx_cases")] == ["uploads/large_volume.nii"]  # the session lives on
    open_volume(driver, CASE)
    wait_for(lambda: f"Opened {CASE}" in text(driver, "cx-message"), 60, "another case in the same session")
    assert len(state(driver, "cx_cases")) == 2


def test_damaged_files_are_refused_on_open_and_upload_and_leave_nothing_in_uploads(app, browsers, tmp_path):
    """A cut .nii.gz is read through the engine's checked reader (as the CLI does): opening it from the data
    root or uploading it gives one error naming the file, relative to the data root, and the upload leaves
    nothing in uploads/."""
    whole = (app["root"] / CASE).read_bytes()
    cut = app["root"] / "cases" / "cut.nii.gz"
    cut.write_bytes(whole[:len(whole) // 2])
    driver = browsers()
    open_page(driver, app["url"])
    open_volume(driver, "cases/cut.nii.gz")
    wait_for(lambda: text(driver, "cx-error"), 60, "the refusal of a cut file")
    assert text(driver, "cx-error").startswith("cases/cut.nii.gz: "), text(driver, "cx-error")
    assert str(app["root"]) not in text(driver, "cx-error")
    assert not state(driver, "cx_cases")

    before = sorted(p.name for p in (app["root"] / "uploads").iterdir()) if (app["root"] / "uploads").exists() else []
    damaged = tmp_path / "damaged.nii.gz"
    damaged.write_bytes(whole[:len(whole) // 2])
    upload_file(driver, damaged)
    wait_for(lambda: "damaged.nii.gz" in text(driver, "cx-error"), 60, "the refusal of a damaged upload")
    assert "nothing was saved" in text(driver, "cx-error")
    assert sorted(p.name for p in (app["root"] / "uploads").iterdir()) == before
    assert not state(driver, "cx_cases")


def test_upload_within_the_cap_opens_with_a_safe_name(app, browsers, tmp_path):
    driver = browsers()
    open_page(driver, app["url"])
    small = tmp_path / "my case.nii.gz"
    shutil.copy(app["root"] / CASE, small)
    upload_file(driver, small)
    wait_for(lambda: "Opened uploads/my_case.nii.gz" in text(driver, "cx-message") or text(driver, "cx-error"), 60,
             "the uploaded case")
    assert "Opened uploads/my_case.nii.gz" in text(driver, "cx-message"), text(driver, "cx-error")
    assert (app["root"] / "uploads" / "my_case.nii.gz").read_bytes() == small.read_bytes()
    assert driver.find_element(By.ID, "cx-segment").is_enabled()


def copy_case(app, name: str) -> str:
    """A copy of the test case under a new name in the data root (each test edits its own)."""
    relative = f"cases/{name}.nii.gz"
    shutil.copy(app["root"] / CASE, app["root"] / relative)
    return relative


def open_and_segment(driver, app, relative, model=None):
    open_page(driver, app["url"])
    open_volume(driver, relative)
    wait_for(lambda: f"Opened {relative}" in text(driver, "cx-message") or text(driver, "cx-error"), 60, "the case")
    set_state(driver, "cx_model", str((model or app["model"]).resolve()))
    time.sleep(0.3)
    driver.find_element(By.ID, "cx-segment").click()
    wait_for(lambda: "Segmented" in text(driver, "cx-message") and not state(driver, "cx_busy"), 300, "the segmentation")


def press(driver, *keys):
    """A key chord sent to the page (not to a field), e.g. press(driver, Keys.CONTROL, "z")."""
    driver.execute_script("document.activeElement && document.activeElement.blur()")
    actions = ActionChains(driver)
    for key in keys[:-1]:
        actions.key_down(key)
    actions.send_keys(keys[-1])
    for key in reversed(keys[:-1]):
        actions.key_up(key)
    actions.perform()
    time.sleep(1)


def answer(driver, proceed: bool):
    """Answers the page's question (Segment, Close and Reload ask before they discard unsaved edits)."""
    wait_for(lambda: state(driver, "cx_question"), 30, "the question")
    button = wait_for(lambda: [b for b in driver.find_elements(By.ID, "cx-question-proceed" if proceed else
                                                               "cx-question-cancel") if b.is_displayed()], 10, "its buttons")
    button[0].click()
    wait_for(lambda: not state(driver, "cx_question"), 10, "the question to close")


def paint_strokes(driver, offsets):
    """Short Paint strokes in the axial view, one per offset, each given time to land; then no tool."""
    choose_effect(driver, "mdi-brush", "Paint")
    for offset in offsets:
        drag_across_the_main_view(driver, offset=offset, steps=4)
        time.sleep(1)
    choose_effect(driver, "mdi-cursor-default", "NoTool")
    time.sleep(1)


def test_resegmenting_is_one_undo_step_the_keyboard_undoes_and_close_asks(app, browsers):
    """Segment on a case with unsaved edits asks first; its result is one undo step, so Ctrl+Z brings the
    edits back and Ctrl+Y / Ctrl+Shift+Z redo it. All eight strokes can be undone (trame-slicer keeps 5).
    Close asks before it discards unsaved edits."""
    from cotexnet.bundle import read_bundle_config
    from selenium.webdriver.common.keys import Keys

    num_classes = read_bundle_config(app["model"]).num_classes
    relative = copy_case(app, "undo_case")
    driver = browsers()
    open_and_segment(driver, app, relative)
    original = saved_counts(app, driver, num_classes, relative)
    make_active(driver, 0)
    paint_strokes(driver, [(-120 + 30 * stroke, -60) for stroke in range(7)])
    painted = saved_counts(app, driver, num_classes, relative)
    assert painted[0] > original[0]
    # The segment statistics follow the edits (counted the way Save writes the file).
    wait_for(lambda: [row["voxels"] for row in state(driver, "cx_statistics")] == painted, 30, "the statistics")
    paint_strokes(driver, [(0, 80)])  # an unsaved edit

    driver.find_element(By.ID, "cx-segment").click()
    answer(driver, proceed=False)
    assert not state(driver, "cx_busy") and "Segmenting" not in text(driver, "cx-message")
    driver.find_element(By.ID, "cx-segment").click()
    answer(driver, proceed=True)
    wait_for(lambda: "Segmented" in text(driver, "cx-message") and not state(driver, "cx_busy"), 300, "the re-run")
    assert state(driver, "SegmentEditorState__can_undo"), "re-segmenting left nothing to undo"
    resegmented = saved_counts(app, driver, num_classes, relative)
    assert resegmented == original  # the same model on the same case
    press(driver, Keys.CONTROL, "z")
    edited = saved_counts(app, driver, num_classes, relative)
    assert edited[0] > painted[0], f"Undo after Segment did not bring the edits back: {resegmented} -> {edited}"
    press(driver, Keys.CONTROL, Keys.SHIFT, "z")
    assert saved_counts(app, driver, num_classes, relative) == resegmented
    press(driver, Keys.CONTROL, "z")
    press(driver, Keys.CONTROL, "y")
    assert saved_counts(app, driver, num_classes, relative) == resegmented
    for _ in range(9):  # the re-run, then all eight strokes
        press(driver, Keys.CONTROL, "z")
    # Save is handled after the key presses (one websocket, in order): with trame-slicer's 5 steps the first
    # strokes would stay.
    assert saved_counts(app, driver, num_classes, relative) == original

    paint_strokes(driver, [(0, 40)])
    driver.find_element(By.ID, "cx-close").click()
    answer(driver, proceed=False)
    assert state(driver, "cx_opened") == relative
    driver.find_element(By.ID, "cx-close").click()
    answer(driver, proceed=True)
    wait_for(lambda: f"Closed {relative}" in text(driver, "cx-message"), 30, "the case to close")


def test_a_saved_segmentation_opens_with_its_volume_and_two_sessions_cannot_overwrite_each_other(app, browsers):
    """Opening a volume loads the .seg.nrrd beside it (names, colours, voxels) and its segment statistics;
    Save writes them as CSV. When two sessions edit the same case, the second Save refuses (the file changed
    since it was read) and offers reload or a copy."""
    from cotexnet.data import read_image, read_label_map, write_segmentation_nrrd

    relative = copy_case(app, "shared_case")
    saved = app["root"] / relative.replace(".nii.gz", ".seg.nrrd")
    image = read_image(app["root"] / relative)
    labels = np.zeros(image.array.shape, np.uint8)
    labels[4:9, 20:40, 20:45] = 1  # the case has 19 slices
    labels[10:14, 50:60, 40:50] = 2
    assert (labels == 1).any() and (labels == 2).any()
    write_segmentation_nrrd(labels, image.geometry, saved, ["tumour", "oedema"], [(1, 0, 0), (0, 0, 1)])
    first, second = browsers(), browsers()
    for driver in (first, second):
        open_page(driver, app["url"])
        open_volume(driver, relative)
        wait_for(lambda: "Opened" in text(driver, "cx-message") or text(driver, "cx-error"), 60, "the case")
        assert text(driver, "cx-message") == f"Opened {relative} with its saved segmentation " \
                                              f"{relative.replace('.nii.gz', '.seg.nrrd')} (2 segments).", text(driver, "cx-error")
        names = [s["name"] for s in state(driver, "SegmentEditorState__segment_list__SegmentListState__segments")]
        assert names == ["tumour", "oedema"]
    assert saved_counts(app, first, 2, relative) == [int((labels == 1).sum()), int((labels == 2).sum())]
    written = saved.read_bytes()
    # Segment statistics: voxels and mL per segment, in the page and in the CSV that Save writes beside it.
    voxel_ml = float(np.prod(image.geometry.spacing)) / 1000
    rows = state(first, "cx_statistics")
    assert [(row["segment"], row["voxels"]) for row in rows] == [("tumour", int((labels == 1).sum())),
                                                                  ("oedema", int((labels == 2).sum()))]
    for row in rows:
        assert row["ml"] == pytest.approx(row["voxels"] * voxel_ml, abs=1e-3)
    table = (saved.parent / "shared_case.statistics.csv").read_text().splitlines()
    assert table[0] == "segment,voxels,volume_ml" and table[1].startswith(f"tumour,{int((labels == 1).sum())},")

    second.find_element(By.ID, "cx-save").click()
    wait_for(lambda: "changed on disk" in text(second, "cx-error"), 30, "the refusal")
    assert "reload it or save as a copy" in text(second, "cx-error")
    assert saved.read_bytes() == written
    second.find_element(By.ID, "cx-save-copy").click()
    copy = saved.with_name("shared_case-copy-1.seg.nrrd")
    wait_for(copy.exists, 30, "the copy")
    assert np.array_equal(read_label_map(copy, reference=image, classes=["tumour", "oedema"]), labels)
    second.find_element(By.ID, "cx-save").click()
    wait_for(lambda: "changed on disk" in text(second, "cx-error"), 30, "the refusal, again")
    second.find_element(By.ID, "cx-reload").click()
    wait_for(lambda: "Reloaded" in text(second, "cx-message"), 30, "the reload")
    assert saved_counts(app, second, 2, relative) == [int((labels == 1).sum()), int((labels == 2).sum())]


def test_the_page_says_what_it_cannot_do_yet_and_refuses_fractional_epochs(app, browsers):
    """Before a volume: the views say so, Segment looks disabled, Add segment says why it does nothing; the
    footer names this app. Epochs "2.5" is refused, not run as 2."""
    driver = browsers()
    open_page(driver, app["url"])
    assert driver.find_element(By.ID, "cx-no-volume").is_displayed()
    segment = driver.find_element(By.ID, "cx-segment")
    assert not segment.is_enabled() and "grey" in segment.get_attribute("class")
    footer = driver.find_element(By.CSS_SELECTOR, "footer").text
    assert "Kitware Inc." not in footer and "CoTexNet" in footer
    add_segment_button(driver).click()
    wait_for(lambda: "open a volume first" in text(driver, "cx-error"), 30, "the Add segment message")

    open_volume(driver, CASE)
    wait_for(lambda: "Opened" in text(driver, "cx-message"), 60, "the volume")
    assert not driver.find_element(By.ID, "cx-no-volume").is_displayed()
    assert "primary" in driver.find_element(By.ID, "cx-segment").get_attribute("class")
    set_state(driver, "cx_epochs", 2.5)
    time.sleep(0.3)
    driver.find_element(By.ID, "cx-train").click()
    wait_for(lambda: "epochs: expected a whole number" in text(driver, "cx-error"), 30, "the refusal of 2.5 epochs")
    assert not state(driver, "cx_training")


def test_lists_refresh_on_demand_and_on_page_load_with_images_and_segmentations_apart(app, browsers):
    """A file added under the data root after the session started appears on Refresh and on a page reload;
    segmentations (.seg.nrrd, label map folders) and training exports are not offered as volumes."""
    driver = browsers()
    open_page(driver, app["url"])
    added = app["root"] / "later" / "added_0000.nii.gz"
    label = app["root"] / "later" / "labelsTr" / "added.nii.gz"
    label.parent.mkdir(parents=True)
    shutil.copy(app["root"] / CASE, added)
    shutil.copy(app["root"] / CASE, label)
    assert "later/added_0000.nii.gz" not in state(driver, "cx_volumes")
    driver.find_element(By.ID, "cx-refresh").click()
    wait_for(lambda: "later/added_0000.nii.gz" in state(driver, "cx_volumes"), 30, "the new file after Refresh")
    volumes, segmentations = state(driver, "cx_volumes"), state(driver, "cx_segmentations")
    assert "later/labelsTr/added.nii.gz" in segmentations and "later/labelsTr/added.nii.gz" not in volumes
    assert not [v for v in volumes if v.endswith(".seg.nrrd") or v.startswith("runs/")], volumes
    second = app["root"] / "later" / "second_0000.nii.gz"
    shutil.copy(app["root"] / CASE, second)
    driver.refresh()  # the same session (its cookie), a new page
    wait_for(lambda: driver.find_elements(By.ID, "cx-open"), 90, "the page")
    wait_for(lambda: "later/second_0000.nii.gz" in (state(driver, "cx_volumes") or []), 30, "the list on reload")


def test_the_keyboard_steps_slices_chooses_segments_and_tools(app, browsers):
    """Arrow keys and Page Up/Down step the axial slice; 1-9 choose a segment; B, E and Escape choose paint,
    erase and no tool (web/keys.js)."""
    from selenium.webdriver.common.keys import Keys

    relative = copy_case(app, "keys_case")
    driver = browsers()
    open_and_segment(driver, app, relative)
    segments = [s["segment_id"] for s in state(driver, "SegmentEditorState__segment_list__SegmentListState__segments")]
    start = slice_positions(driver)[0]
    press(driver, Keys.ARROW_UP)
    up = wait_for(lambda: slice_positions(driver)[0] > start and slice_positions(driver)[0], 30, "ArrowUp")
    press(driver, Keys.PAGE_DOWN)
    expected = up - 10 * (up - start)  # 10 steps
    wait_for(lambda: abs(slice_positions(driver)[0] - expected) < 0.02, 30, f"PageDown from {up} to {expected}")
    active = "SegmentEditorState__segment_list__SegmentListState__active_segment_id"
    for key, segment in (("2", segments[1]), ("1", segments[0])):
        press(driver, key)
        wait_for(lambda: state(driver, active) == segment, 30, f"key {key} to choose its segment")
    for key, effect in (("b", "Paint"), ("e", "Erase"), (Keys.ESCAPE, "NoTool")):
        press(driver, key)
        wait_for(lambda: (state(driver, "SegmentEditorState__active_effect_name") or "").endswith(effect), 30,
                 f"key {key!r} to choose {effect}")


def test_the_brush_size_beside_paint_and_erase_sets_the_diameter_the_effect_paints_with(app, browsers, tmp_path):
    """Beside the paint and erase buttons, + and - change the active effect's brush diameter (by trame-slicer's
    ratio 1.1 a step, as the keys do) and the effect panel's slider follows; a dot painted after eight + steps
    covers more voxels than one painted before. The control shows only while paint or erase is active."""
    from cotexnet.data.image import read_segmentation_file

    relative = copy_case(app, "brush_case")
    saved = app["root"] / relative.replace(".nii.gz", ".seg.nrrd")
    driver = browsers()
    open_page(driver, app["url"])
    open_volume(driver, relative)
    wait_for(lambda: f"Opened {relative}" in text(driver, "cx-message"), 60, "the case")
    assert not driver.find_elements(By.ID, "cx-brush")
    add_segment_button(driver).click()
    wait_for(lambda: state(driver, "SegmentEditorState__segment_list__SegmentListState__active_segment_id"), 30,
             "the new segment")
    choose_effect(driver, "mdi-brush", "Paint")
    slider = "PaintEffectState__brush_diameter_slider__SliderState__value"
    shown = lambda: float(driver.find_element(By.ID, "cx-brush-size").text)  # noqa: E731
    start = wait_for(lambda: state(driver, slider), 30, "the brush diameter")
    assert shown() == pytest.approx(start, abs=0.05)

    def painted_voxels() -> int:
        """Paints a dot in the axial view, saves, and counts the segment's voxels in the written file."""
        before = saved.stat().st_mtime_ns if saved.exists() else None
        counted = sum(row["voxels"] for row in state(driver, "cx_statistics"))
        ActionChains(driver).move_to_element_with_offset(main_view(driver), *offset).click_and_hold().move_by_offset(
            1, 0).release().perform()
        wait_for(lambda: sum(row["voxels"] for row in state(driver, "cx_statistics")) > counted, 30, "the dot")
        driver.find_element(By.ID, "cx-save").click()
        wait_for(lambda: saved.exists() and saved.stat().st_mtime_ns != before, 30, "the saved segmentation")
        return int(np.count_nonzero(read_segmentation_file(saved)[0]["voxels"]))

    offset = (-80, 0)
    small = painted_voxels()
    for _ in range(8):
        driver.find_element(By.ID, "cx-brush-larger").click()
        time.sleep(0.3)
    larger = start * 1.1 ** 8
    wait_for(lambda: abs(state(driver, slider) - larger) < 1e-3 * larger, 30, f"the diameter {larger:.2f}")
    wait_for(lambda: abs(shown() - larger) <= 0.05, 10, "the shown diameter")
    save_screenshot(driver, "app-brush-size.png", tmp_path)
    offset = (80, 0)  # apart from the first dot
    large = painted_voxels() - small
    print(f"brush diameter {start:.2f} -> {larger:.2f}: a dot painted {small} -> {large} voxels")
    assert small > 0 and large > 4 * small, (small, large)  # a sphere brush: about (1.1 ** 8) ** 3 = 9.8 times

    driver.find_element(By.ID, "cx-brush-smaller").click()
    wait_for(lambda: abs(state(driver, slider) - larger / 1.1) < 1e-3 * larger, 30, "one step smaller")
    choose_effect(driver, "mdi-eraser", "Erase")  # erase shares the brush, and the control stays
    assert abs(shown() - larger / 1.1) <= 0.05
    choose_effect(driver, "mdi-cursor-default", "NoTool")
    wait_for(lambda: not driver.find_elements(By.ID, "cx-brush"), 10, "the control to hide with no brush tool")


def test_window_level_presets_orientation_labels_and_slice_positions(app, browsers):
    """Each slice view names the patient's sides (radiological convention) and its slice position; a
    window/level preset sets the volume's window and level."""
    driver = browsers()
    open_page(driver, app["url"])
    open_volume(driver, CASE)
    wait_for(lambda: "Opened" in text(driver, "cx-message"), 60, "the volume")
    labels = [e.text for e in driver.find_elements(By.CSS_SELECTOR, ".cx-orientation")]
    assert sorted(labels) == sorted(["R", "L", "A", "P"] + ["R", "L", "S", "I"] + ["A", "P", "S", "I"]), labels
    positions = sorted(e.text for e in driver.find_elements(By.CSS_SELECTOR, ".cx-slice-position"))
    red, green, yellow = slice_positions(driver)
    assert positions == sorted([f"S {red:.1f} mm", f"A {green:.1f} mm", f"R {yellow:.1f} mm"]), positions
    chooser = driver.find_element(By.ID, "cx-window-level").find_element(By.XPATH, "ancestor::div[contains(@class, 'v-select')][1]")
    for preset, expected in (("CT brain", [80.0, 40.0]), ("CT lung", [1500.0, -600.0])):
        chooser.find_element(By.CSS_SELECTOR, ".v-field").click()
        wait_for(lambda: [i for i in driver.find_elements(By.CSS_SELECTOR, ".v-overlay .v-list-item")
                          if i.is_displayed() and i.text == preset], 10, "the presets")[0].click()
        wait_for(lambda: state(driver, "cx_window_level") == expected, 30, f"the {preset} window")
    assert not driver.find_elements(By.ID, "cx-reload"), "Reload is offered without a conflict"


def test_segments_that_are_not_the_models_classes_are_shown_before_training_and_can_be_mapped(app, browsers):
    """A case whose white matter segment is named "WM": Train lists "WM" first with a choice (add, skip, map);
    mapped to white matter, the run keeps the model's two classes instead of training a third."""
    from cotexnet.bundle import read_bundle_config
    from cotexnet.data import read_image, write_segmentation_nrrd
    from cotexnet.infer import predict_volume
    from cotexnet import CoTexNet

    config = read_bundle_config(app["model"])
    relative = copy_case(app, "renamed_case")
    image = read_image(app["root"] / relative)
    labels = predict_volume(CoTexNet.from_pretrained(app["model"]), image, device="cpu").labels
    names = [("WM" if name == "white matter" else name) for name in config.classes]
    write_segmentation_nrrd(labels, image.geometry, app["root"] / relative.replace(".nii.gz", ".seg.nrrd"), names,
                            config.colors)
    driver = browsers()
    open_page(driver, app["url"])
    open_volume(driver, relative)
    wait_for(lambda: "saved segmentation" in text(driver, "cx-message"), 60, "the case with its segmentation")
    set_state(driver, "cx_model", str(app["model"].resolve()))
    set_state(driver, "cx_epochs", 1)
    time.sleep(0.3)
    driver.find_element(By.ID, "cx-train").click()
    wait_for(lambda: state(driver, "cx_unknown"), 30, "the list of unknown segments")
    assert [row["name"] for row in state(driver, "cx_unknown")] == ["WM"]
    assert not state(driver, "cx_training")
    choice = driver.find_element(By.CSS_SELECTOR, ".cx-unknown-choice .v-field")
    choice.click()
    wait_for(lambda: [i for i in driver.find_elements(By.CSS_SELECTOR, ".v-overlay .v-list-item")
                      if i.is_displayed() and i.text == "map to white matter"], 10, "the choices")[0].click()
    time.sleep(0.5)
    driver.find_element(By.ID, "cx-unknown-train").click()
    wait_for(lambda: state(driver, "cx_training") or text(driver, "cx-error"), 60, "the training to start")
    assert text(driver, "cx-error") == ""
    wait_for(lambda: not state(driver, "cx_training") and "Mean Dice" in text(driver, "cx-train-message"), 600,
             "the training and its comparison")
    run = next(c["value"] for c in state(driver, "cx_models") if c["value"].startswith("runs/renamed_case-"))
    assert list(read_bundle_config(app["root"] / run).classes) == list(config.classes)
    assert [s["name"] for s in state(driver, "SegmentEditorState__segment_list__SegmentListState__segments")] == names
