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
#: Upload cap of the app under test, in MiB: the demo case (about 70 KiB) fits, a 1 MiB file does not.
UPLOAD_LIMIT_MB = 0.5
#: Where screenshots go (scripts/test-app.sh keeps them for the README); a temporary folder otherwise.
SCREENSHOTS = os.environ.get("COTEXNET_APP_SCREENSHOTS")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def write_dicom_series(image_path: Path, folder: Path) -> None:
    """Writes a volume as an MR DICOM series, one file per slice, with the geometry tags a reader sorts and
    places slices by (ImagePositionPatient, ImageOrientationPatient, PixelSpacing, SliceThickness). The
    intensities (0..1 in the demo's template) are stored as integers times 1000."""
    import SimpleITK as sitk

    image = sitk.ReadImage(str(image_path))
    stored = sitk.Cast(sitk.Round(image * 1000.0), sitk.sitkInt16)
    direction = np.reshape(image.GetDirection(), (3, 3))
    orientation = "\\".join(f"{v:.6f}" for v in (*direction[:, 0], *direction[:, 1]))
    study, series = "1.2.826.0.1.3680043.2.1125.1.1", "1.2.826.0.1.3680043.2.1125.1.2"
    folder.mkdir(parents=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(stored.GetDepth()):
        slice_ = stored[:, :, k]
        position = image.TransformIndexToPhysicalPoint((0, 0, k))
        for tag, value in (("0008|0060", "MR"), ("0020|000d", study), ("0020|000e", series),
                           ("0008|0018", f"{series}.{k + 1}"), ("0020|0013", str(k + 1)),
                           ("0020|0032", "\\".join(f"{v:.6f}" for v in position)), ("0020|0037", orientation),
                           ("0018|0050", f"{image.GetSpacing()[2]:.6f}"), ("0010|0010", "MNI152^Template"),
                           ("0008|103e", "MNI152 T1 test series")):
            slice_.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"slice_{k:03d}.dcm"))
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
         str(port), "--token", TOKEN, "--device", "cpu", "--max-sessions", "8", "--upload-limit-mb",
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
def segmented(app, browsers):
    """A page with the demo case opened and segmented, shared by the tests of what follows a segmentation."""
    driver = browsers()
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
    assert positions[0] != positions[1], "two segments with different centres gave the same slice positions"
    assert positions[2] == positions[0], "the same row jumped to another place the second time"


def saved_counts(app, driver, num_classes) -> list[int]:
    """Saves the segmentation from the page and counts each class's voxels in the written file."""
    from cotexnet.data import read_image, read_label_map

    saved = app["root"] / SAVED
    before = saved.stat().st_mtime_ns if saved.exists() else None
    driver.find_element(By.ID, "cx-save").click()
    wait_for(lambda: saved.exists() and saved.stat().st_mtime_ns != before and "Saved" in text(driver, "cx-message"),
             30, "the saved segmentation")
    labels = read_label_map(saved, reference=read_image(app["root"] / CASE), num_classes=num_classes)
    return [int((labels == index).sum()) for index in range(1, num_classes + 1)]


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


def test_training_from_the_page_plots_each_epoch_and_becomes_the_current_model(app, segmented):
    """Two epochs on the opened case from the current model: loss and per-class Dice get a point per epoch
    while it runs, and the run becomes the chosen model, listed among the recent models, and segments."""
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

    run = state(driver, "cx_model")
    assert run.startswith("runs/2-cases-"), run
    last = json.loads((app["root"] / run / "last" / "training.json").read_text())  # best/ is the best epoch's
    assert last["epochs_run"] == 2 and Path(last["options"]["init_from"]) == app["model"]
    assert sorted(case for cases in last["split"].values() for case in cases) == ["case_000", "case_001"]
    assert (app["root"] / run / "best" / "config.json").is_file()
    chooser = driver.find_element(By.ID, "cx-model").find_element(By.XPATH, "ancestor::div[contains(@class, 'v-select')][1]")
    assert chooser.find_element(By.CSS_SELECTOR, ".v-select__selection-text").text.startswith(run)
    recent = json.loads((app["config"] / "cotexnet" / "app-recent-models.json").read_text())["models"]
    assert recent[0] == str((app["root"] / run).resolve())

    driver.find_element(By.ID, "cx-segment").click()
    wait_for(lambda: "Segmented" in text(driver, "cx-message") and not state(driver, "cx_busy"), 300,
             "a segmentation with the new model")
    assert text(driver, "cx-error") == ""


def test_stop_ends_a_training_after_its_step_and_keeps_its_best_model(app, segmented):
    """Stop writes the run's stop file (CoTexNetTrainLogic.requestStop); the process saves and exits long
    before its 50 epochs, and the stopped run still becomes the chosen model."""
    driver = segmented
    set_state(driver, "cx_epochs", 50)
    time.sleep(0.3)
    driver.find_element(By.ID, "cx-train").click()
    # The run's own first point: the page may still draw the previous run's points when cx_training turns on.
    wait_for(lambda: state(driver, "cx_training") and state(driver, "cx_charts")[0]["series"][0]["dots"], 300,
             "the first epoch")
    driver.find_element(By.ID, "cx-stop").click()
    wait_for(lambda: not state(driver, "cx_training"), 120, "the training to stop")
    assert text(driver, "cx-error") == ""
    assert text(driver, "cx-train-message").startswith("Stopped")
    epochs = len(state(driver, "cx_charts")[0]["series"][0]["dots"])
    assert 1 <= epochs < 50
    run = app["root"] / state(driver, "cx_model")
    assert (run / "best" / "config.json").is_file() and (run / "stop-training").exists()


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


def test_upload_within_the_cap_opens_and_one_over_it_is_refused(app, browsers, tmp_path):
    driver = browsers()
    open_page(driver, app["url"])
    upload = driver.find_element(By.CSS_SELECTOR, "#cotexnet-panel input[type=file]")
    big = tmp_path / "big.nii.gz"
    big.write_bytes(os.urandom(int(2 * UPLOAD_LIMIT_MB * 2**20)))
    upload.send_keys(str(big))
    wait_for(lambda: "over the upload limit" in text(driver, "cx-error"), 30, "the refusal of an oversized upload")
    assert not (app["root"] / "uploads" / "big.nii.gz").exists()

    small = tmp_path / "my case.nii.gz"
    shutil.copy(app["root"] / CASE, small)
    upload.send_keys(str(small))
    wait_for(lambda: "Opened uploads/my_case.nii.gz" in text(driver, "cx-message") or
             (text(driver, "cx-error") and "over the upload" not in text(driver, "cx-error")), 60, "the uploaded case")
    assert "Opened uploads/my_case.nii.gz" in text(driver, "cx-message"), text(driver, "cx-error")
    assert (app["root"] / "uploads" / "my_case.nii.gz").read_bytes() == small.read_bytes()
    assert driver.find_element(By.ID, "cx-segment").is_enabled()
