"""Take docs/app-screenshot.png: the app in headless Chromium with a case segmented by a trained model.

Run in the app's virtualenv (scripts/setup-app.sh "app,app-test") with a model trained long enough that the
result looks like anatomy, e.g. the demo's (`cotexnet demo --out DEMO`, then DEMO/model):

    .venv-app/bin/python scripts/app-screenshot.py --model DEMO/model --case DEMO/data/imagesTr/mni152_04_0000.nii.gz

The case and the model are copied into a temporary data root; the app runs on a free loopback port with a token, as a user
starts it, and the page is driven as a user would: open, Segment, click the first concept-table row.
"""
from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.common.by import By

from cotexnet.bundle import bundle_folder

REPO = Path(__file__).resolve().parents[1]
TOKEN = "screenshot"


def wait_for(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise TimeoutError(f"timed out after {timeout} s waiting for {what}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="bundle or training run folder")
    parser.add_argument("--case", required=True, help="volume file to segment")
    parser.add_argument("--out", default=str(REPO / "docs" / "app-screenshot.png"))
    parser.add_argument("--size", default="1600,1000", help="browser window, width,height")
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="cotexnet-screenshot-"))
    (root / "cases").mkdir()
    case = "cases/" + Path(args.case).name
    shutil.copy(args.case, root / case)
    model = Path(args.model).resolve()
    shutil.copytree(bundle_folder(model), root / "models" / (model.parent.name if model.name == "model" else model.name))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    app = subprocess.Popen([sys.executable, "-m", "cotexnet.cli", "app", "--data-root", str(root), "--port", str(port),
                            "--token", TOKEN, "--device", "cpu"],
                           cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO), "XDG_CONFIG_HOME": str(root / ".config")})
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or shutil.which("chromium-browser")
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", f"--window-size={args.size}",
                     f"--user-data-dir={root / '.chromium'}"):
        options.add_argument(argument)
    driver = None
    try:
        def answers():
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2)
            except urllib.error.HTTPError:
                return True  # 403 without the token: it is up
            except OSError:
                return False

        wait_for(answers, 60, "the app to start")
        driver = webdriver.Chrome(service=webdriver.ChromeService(shutil.which("chromedriver")), options=options)
        driver.get(f"http://127.0.0.1:{port}/?token={TOKEN}")
        wait_for(lambda: driver.find_elements(By.ID, "cx-open"), 90, "the page")
        driver.execute_script("window.trame.state.set('cx_volume', arguments[0])", case)
        time.sleep(0.3)
        driver.find_element(By.ID, "cx-open").click()
        wait_for(lambda: "Opened" in driver.find_element(By.ID, "cx-message").text, 60, "the case to open")
        # A window/level preset (its W/L shows beside the chooser); the views carry their orientation labels.
        chooser = driver.find_element(By.ID, "cx-window-level").find_element(By.XPATH, "ancestor::div[contains(@class, 'v-select')][1]")
        chooser.find_element(By.CSS_SELECTOR, ".v-field").click()
        wait_for(lambda: [item for item in driver.find_elements(By.CSS_SELECTOR, ".v-overlay .v-list-item")
                          if item.is_displayed() and item.text == "MR auto"], 10, "the presets")[0].click()
        driver.find_element(By.ID, "cx-segment").click()
        rows = wait_for(lambda: driver.find_elements(By.CSS_SELECTOR, ".cx-concept-row"), 600, "the segments")
        rows[0].find_element(By.TAG_NAME, "td").click()  # the class cell: the table keeps its left edge in view
        time.sleep(3)  # the views render the segments
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(args.out)
        print(f"{args.out}: {driver.find_element(By.ID, 'cx-message').text}")
    finally:
        if driver is not None:
            driver.quit()
        app.terminate()
        app.wait(30)
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
