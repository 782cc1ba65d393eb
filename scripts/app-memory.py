"""Measure `cotexnet app`'s memory: the gateway's whole process tree after N browser sessions each opened the page
and segmented one case (the table in docs/web-app.md).

Run in the app's virtualenv, from the checkout to measure:

    .venv-app/bin/python scripts/app-memory.py --model MODEL --case CASE.nii.gz --sessions 1 4

For each count a fresh app starts on a free loopback port; N headless Chromium windows (each its own browser
session) open the page, open the case and Segment, one after the other, until the concept table shows; then,
with every page still open, RSS and PSS are summed over the gateway and all its descendants (psutil). PSS
shares each shared page among the processes that map it, so it does not count torch's libraries once per
process as RSS does. Chromium is not in the gateway's tree and is not counted. Prints one JSON line per count.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import psutil
from selenium import webdriver
from selenium.webdriver.common.by import By
from selenium.webdriver.support.wait import WebDriverWait as wait

TOKEN = "memory"


def browser(profile: Path):
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or shutil.which("chromium-browser")
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1400,900",
                     f"--user-data-dir={profile}"):
        options.add_argument(argument)
    return webdriver.Chrome(service=webdriver.ChromeService(shutil.which("chromedriver")), options=options)


def process_kind(process: psutil.Process) -> str:
    """gateway, session, worker, or relay (a session's worker process that forwards to the shared workers)."""
    command = " ".join(process.cmdline())
    if "cotexnet.worker" in command:
        return "relay" if "cotexnet_app.session" in " ".join(process.parent().cmdline()) and \
            "COTEXNET_WORKER_SOCKET" in process.environ() else "worker"
    for module, kind in (("cotexnet_app.session", "session"), ("cotexnet.cli app", "gateway")):
        if module in command:
            return kind
    return process.name()


def tree_memory(root: psutil.Process) -> dict:
    """Process counts, and RSS and PSS in MiB, in all and per kind of process."""
    rss, pss, count = Counter(), Counter(), Counter()
    for process in [root, *root.children(recursive=True)]:
        try:
            kind, info = process_kind(process), process.memory_full_info()
        except psutil.NoSuchProcess:
            continue
        count[kind] += 1
        rss[kind] += info.rss >> 20
        pss[kind] += info.pss >> 20
    return {"rss_mib": sum(rss.values()), "pss_mib": sum(pss.values()),
            "kinds": {kind: {"processes": count[kind], "rss_mib": rss[kind], "pss_mib": pss[kind]} for kind in count}}


def measure(repo: Path, model: Path, case: Path, sessions: int, work: Path) -> dict:
    root = work / f"root{sessions}"
    (root / "cases").mkdir(parents=True)
    shutil.copy(case, root / "cases" / case.name)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log = open(work / f"app{sessions}.log", "w")
    app = subprocess.Popen([sys.executable, "-m", "cotexnet.cli", "app", "--data-root", str(root), "--model", str(model),
                            "--port", str(port), "--token", TOKEN, "--device", "cpu", "--max-sessions", str(sessions)],
                           cwd=repo, stdout=log, stderr=subprocess.STDOUT,
                           env={**os.environ, "PYTHONPATH": str(repo), "XDG_CONFIG_HOME": str(work / f"config{sessions}")})
    drivers = []
    try:
        deadline = time.monotonic() + 60
        while True:  # the app is up when its port answers
            try:
                socket.create_connection(("127.0.0.1", port), timeout=2).close()
                break
            except OSError:
                if time.monotonic() > deadline or app.poll() is not None:
                    raise RuntimeError(f"the app did not start: see {log.name}") from None
                time.sleep(0.2)
        for index in range(sessions):
            driver = browser(work / f"chromium{sessions}-{index}")
            drivers.append(driver)
            driver.get(f"http://127.0.0.1:{port}/?token={TOKEN}")
            wait(driver, 120).until(lambda d: d.find_elements(By.ID, "cx-open"), "the page")
            driver.execute_script("window.trame.state.set('cx_volume', arguments[0])", f"cases/{case.name}")
            time.sleep(0.5)
            driver.find_element(By.ID, "cx-open").click()
            wait(driver, 120).until(lambda d: "Opened" in d.find_element(By.ID, "cx-message").text, "the case to open")
            driver.find_element(By.ID, "cx-segment").click()
            wait(driver, 300).until(lambda d: d.find_elements(By.CSS_SELECTOR, ".cx-concept-row"), "the segmentation")
        time.sleep(3)
        return {"sessions": sessions, **tree_memory(psutil.Process(app.pid))}
    finally:
        for driver in drivers:
            driver.quit()
        app.terminate()
        try:
            app.wait(60)
        except subprocess.TimeoutExpired:
            for process in [app, *psutil.Process(app.pid).children(recursive=True)]:
                process.kill()
        log.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="bundle or training run folder")
    parser.add_argument("--case", required=True, help="volume file each session opens and segments")
    parser.add_argument("--sessions", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--repo", default=str(Path(__file__).resolve().parents[1]), help="checkout whose app runs")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="cotexnet-memory-") as work:
        for count in args.sessions:
            print(json.dumps(measure(Path(args.repo), Path(args.model).resolve(), Path(args.case).resolve(), count,
                                     Path(work))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
