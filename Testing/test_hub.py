"""Model cards and sharing through the Hugging Face Hub, against a stand-in Hub on loopback (no network).

The stand-in implements the routes huggingface_hub (0.2x-0.3x, and 1.x/2.x, which transformers 5 brings) calls for an
upload (create repo, branch, YAML check, preupload, commit) and a download (model info at a revision, the file tree,
HEAD/GET of resolved files).
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np
import pytest
import SimpleITK as sitk

from cotexnet.cli import main
from test_slicer_segment import CLASSES, add_volume, bundle, phantom, scene  # noqa: F401 (fixtures)

huggingface_hub = pytest.importorskip("huggingface_hub")
REPO = Path(__file__).resolve().parents[1]


class StandInHub(ThreadingHTTPServer):
    """Repositories as ``{repo_id: {"private", "branches": {name: sha}, "commits": {sha: {path: bytes}}}}``;
    ``requests`` logs every (method, path) served."""

    def __init__(self):
        super().__init__(("127.0.0.1", 0), HubHandler)
        self.repos, self.requests = {}, []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def commit(self, repo: dict, parent: str | None, files: dict) -> str:
        tree = {**(repo["commits"][parent] if parent else {}), **files}
        sha = hashlib.sha1(json.dumps(sorted((p, hashlib.sha1(b).hexdigest()) for p, b in tree.items())).encode()
                           + str(len(repo["commits"])).encode()).hexdigest()
        repo["commits"][sha] = tree
        return sha


class HubHandler(BaseHTTPRequestHandler):
    server: StandInHub

    def log_message(self, *args):  # quiet
        pass

    def reply(self, status: int, body=None, headers: dict | None = None, error_code: str | None = None):
        data = body if isinstance(body, bytes) else json.dumps(body if body is not None else {}).encode()
        self.send_response(status)
        for key, value in {"Content-Type": "application/json", "Content-Length": str(len(data)),
                           **({"X-Error-Code": error_code} if error_code else {}), **(headers or {})}.items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length", 0)))

    def route(self):
        path = unquote(urlparse(self.path).path)
        self.server.requests.append((self.command, path))
        return path

    def repo(self, repo_id: str):
        return self.server.repos.get(repo_id)

    def do_POST(self):
        path, body = self.route(), self.body()
        if path == "/api/repos/create":
            payload = json.loads(body)
            repo_id = f"{payload['organization']}/{payload['name']}"
            if repo_id in self.server.repos:
                return self.reply(409, {"error": "You already created this model repo", "url": f"{self.server.url}/{repo_id}"})
            repo = {"private": bool(payload.get("private")), "branches": {}, "commits": {}}
            repo["branches"]["main"] = self.server.commit(repo, None, {".gitattributes": b"*.safetensors filter=lfs\n"})
            self.server.repos[repo_id] = repo
            return self.reply(200, {"url": f"{self.server.url}/{repo_id}"})
        if path == "/api/validate-yaml":
            return self.reply(200, {})
        match = re.fullmatch(r"/api/models/([^/]+/[^/]+)/(preupload|commit|branch)/(.+)", path)
        if not match or self.repo(match[1]) is None:
            return self.reply(404, {"error": "Repository not found"}, error_code="RepoNotFound")
        repo, action, revision = self.repo(match[1]), match[2], match[3]
        if action == "branch":
            if revision in repo["branches"]:
                return self.reply(409, {"error": "branch exists"})
            repo["branches"][revision] = repo["branches"]["main"]
            return self.reply(200, {})
        if revision not in repo["branches"]:
            return self.reply(404, {"error": "Invalid rev id"}, error_code="RevisionNotFound")
        if action == "preupload":
            files = json.loads(body)["files"]
            return self.reply(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                              for f in files]})
        files = {}
        for line in body.splitlines():
            item = json.loads(line)
            if item["key"] == "file":
                files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
            elif item["key"] != "header":
                return self.reply(400, {"error": f"the stand-in does not take {item['key']}"})
        sha = self.server.commit(repo, repo["branches"][revision], files)
        repo["branches"][revision] = sha
        return self.reply(200, {"commitUrl": f"{self.server.url}/{match[1]}/commit/{sha}", "commitOid": sha,
                                "pullRequestUrl": None})

    def resolve(self, repo_id: str, revision: str) -> str | None:
        repo = self.repo(repo_id)
        if repo is None:
            return None
        return repo["branches"].get(revision) or (revision if revision in repo["commits"] else None)

    def do_GET(self):
        path = self.route()
        match = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/(.+))?", path)
        if match:
            repo_id, revision = match[1], match[2] or "main"
            if self.repo(repo_id) is None:
                return self.reply(404, {"error": "Repository not found"}, error_code="RepoNotFound")
            sha = self.resolve(repo_id, revision)
            if sha is None:
                return self.reply(404, {"error": "Invalid rev id"}, error_code="RevisionNotFound")
            tree = self.repo(repo_id)["commits"][sha]
            return self.reply(200, {"id": repo_id, "modelId": repo_id, "sha": sha, "private": self.repo(repo_id)["private"],
                                    "siblings": [{"rfilename": name} for name in sorted(tree)]})
        match = re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/([^/]+)", path)
        if match:  # huggingface_hub 1.x/2.x list a snapshot's files here (0.x read the model info's siblings)
            sha = self.resolve(match[1], match[2])
            if sha is None:
                return self.reply(404, {"error": "Invalid rev id"}, error_code="RevisionNotFound")
            tree = self.repo(match[1])["commits"][sha]
            return self.reply(200, [{"type": "file", "path": name, "size": len(data),
                                     "oid": hashlib.sha1(data).hexdigest()} for name, data in sorted(tree.items())])
        match = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        sha = self.resolve(match[1], match[2]) if match else None
        if sha is None:
            return self.reply(404, {"error": "Repository not found"}, error_code="RepoNotFound")
        data = self.repo(match[1])["commits"][sha].get(match[3])
        if data is None:
            return self.reply(404, {"error": "Entry not found"}, error_code="EntryNotFound")
        etag = hashlib.sha256(data).hexdigest()
        self.reply(200, data, {"Content-Type": "application/octet-stream", "X-Repo-Commit": sha, "ETag": f'"{etag}"'})

    do_HEAD = do_GET


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """A running stand-in Hub, huggingface_hub pointed at it and at an empty cache; stopped after the test."""
    from huggingface_hub import constants, file_download

    server = StandInHub()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setattr(constants, "ENDPOINT", server.url)
    template = server.url + "/{repo_id}/resolve/{revision}/{filename}"
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", template)
    monkeypatch.setattr(file_download, "HUGGINGFACE_CO_URL_TEMPLATE", template, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("HF_TOKEN", "hf_standin")
    yield server
    server.shutdown()
    server.server_close()
    thread.join(timeout=10)


def trained_bundle(tmp_path: Path) -> Path:
    """A run folder trained by `cotexnet train` on a small 2D dataset (shapes), with its best bundle."""
    from test_train import quick, shapes_dataset

    from cotexnet.train import train

    data = shapes_dataset(tmp_path / "shapes", count=10, size=48)
    train(quick(data, tmp_path / "run", epochs=4, image_size=48, lr=3e-3))
    return tmp_path / "run"


def test_trained_bundle_card_holds_its_real_metrics_and_an_evaluation_rewrites_it(tmp_path, capsys):
    run = trained_bundle(tmp_path)
    best = run / "best"
    info = json.loads((best / "training.json").read_text())
    card = (best / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: cotexnet\npipeline_tag: image-segmentation\nlicense: unknown\n")
    assert "random-init-not-for-real-use" in card and "not a medical device" in card
    assert "# CoTexNet: disk, square" in card
    # Training data: counts and file names, never the local path.
    split = info["split"]
    assert f"cases: train {len(split['train'])}, val {len(split['val'])}, test {len(split['test'])}" in card
    assert f"`{info['sources']['train'][0]}`" in card and str(tmp_path) not in card
    # Metrics: the best epoch's validation Dice and the 3D Dice/IoU/HD95 the trainer measured per split.
    best_row = max(info["history"], key=lambda row: row["val_dice"])
    assert f"mean Dice {100 * best_row['val_dice']:.2f} %" in card
    test = info["evaluations"]["test"]
    assert test["cases"] == len(split["test"]) and test["per_class"][0]["dice"] > 0  # numbers that tell classes apart
    row = f"| disk | {100 * test['per_class'][0]['dice']:.2f} | {100 * test['per_class'][0]['iou']:.2f} |"
    assert row in card and "### val split" in card
    assert "- Batch: 4 slices x 1 accumulated = 4 per optimiser step" in card  # quick(): batch 4, no accumulation

    # `cotexnet evaluate --json` then `cotexnet card --evaluation`: the train split's numbers land on the card.
    assert main(["evaluate", str(run), str(tmp_path / "shapes"), "--split", "train", "--json", "--device", "cpu"]) == 0
    evaluation = tmp_path / "train-eval.json"
    evaluation.write_text(capsys.readouterr().out)
    assert main(["card", str(run), "--evaluation", str(evaluation), "--license", "apache-2.0"]) == 0
    card = (best / "README.md").read_text()
    result = json.loads(evaluation.read_text())
    assert "license: apache-2.0" in card and "### train split" in card
    assert f"| square | {100 * result['per_class'][1]['dice']:.2f} | {100 * result['per_class'][1]['iou']:.2f} |" in card

    # An evaluation of other classes is refused, and the card stays as it was.
    result["classes"] = ["a", "b"]
    evaluation.write_text(json.dumps(result))
    capsys.readouterr()
    assert main(["card", str(run), "--evaluation", str(evaluation)]) == 2
    assert "evaluates classes ['a', 'b']" in capsys.readouterr().err
    assert (best / "README.md").read_text() == card
    assert main(["card", "alice/not-here", "--license", "mit"]) == 2  # never a Hub id: the cache is not ours to edit
    assert "card rewrites a local bundle" in capsys.readouterr().err


def test_push_then_segment_by_repo_id_round_trips_and_works_offline(hub, tmp_path, tiny_model, capsys):
    from huggingface_hub import constants

    from cotexnet import CoTexNet

    model = tiny_model(classes=("disk", "square"), image_size=32)
    run = tmp_path / "run"
    model.save_pretrained(run / "best", training_info={"data": str(tmp_path / "secret-data"), "split": {}})
    model.save_pretrained(run / "last")
    (run / "last" / "trainer_state.pt").write_bytes(b"optimizer state")
    (run / "best" / "pytorch_model.bin").write_bytes(b"a pickle must never travel")

    assert main(["push", str(run), "alice/disks", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    tree = hub.repos["alice/disks"]["commits"][hub.repos["alice/disks"]["branches"]["main"]]
    assert sorted(tree) == sorted([".gitattributes", *report["files"]])
    assert {"config.json", "model.safetensors", "README.md", "vocab.json"} <= set(tree)
    assert not {"trainer_state.pt", "training.json", "pytorch_model.bin"} & set(tree)
    assert tree["model.safetensors"] == (run / "best" / "model.safetensors").read_bytes()
    assert b"cotexnet segment alice/disks scan.nii.gz" in tree["README.md"]  # the card says how to use it from there

    # A branch: pushed from another bundle, read back at that revision only.
    other = tiny_model(classes=("disk", "square", "ring"), image_size=32)
    other.save_pretrained(tmp_path / "three")
    assert main(["push", str(tmp_path / "three"), "alice/disks", "--revision", "three-classes"]) == 0
    assert CoTexNet.from_pretrained("alice/disks", revision="three-classes").config.classes == ["disk", "square", "ring"]

    # Someone else's machine: segment by repo id; the same labels as the local bundle gives.
    image = tmp_path / "scan.nrrd"
    rng = np.random.default_rng(0)
    sitk.WriteImage(sitk.GetImageFromArray(rng.normal(100, 30, (3, 40, 40)).astype(np.float32)), str(image))
    capsys.readouterr()
    assert main(["segment", "alice/disks", str(image), "--out", str(tmp_path / "hub-out"), "--device", "cpu"]) == 0
    assert main(["segment", str(run), str(image), "--out", str(tmp_path / "local-out"), "--device", "cpu"]) == 0
    hub_labels, local_labels = (sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / out / "scan_labels.nrrd")))
                                for out in ("hub-out", "local-out"))
    np.testing.assert_array_equal(hub_labels, local_labels)
    fetched = {path.rsplit("/", 1)[-1] for method, path in hub.requests if "/resolve/" in path and method == "GET"}
    assert "model.safetensors" in fetched and not any(name.endswith((".bin", ".pt", ".py")) for name in fetched)

    # The Hub is gone: the Slicer field's summary comes from the cache; a fresh process with HF_HUB_OFFLINE=1
    # segments from the cache alone and names what is missing when a repository was never downloaded.
    hub.shutdown()
    hub.server_close()
    from CoTexNetSegmentLib.logic import CoTexNetSegmentLogic

    description = CoTexNetSegmentLogic.modelDescription("alice/disks")
    assert (description["title"], description["classes"]) == ("CoTexNet: disk, square (MR, axial slices)",
                                                              ["disk", "square"])
    assert description["config"].classes == ["disk", "square"]
    # A repository never downloaded is named, not fetched: the field updates on Slicer's GUI thread (issue 19).
    started = time.perf_counter()
    assert CoTexNetSegmentLogic.modelDescription("bob/unknown") == {
        "title": "bob/unknown: a Hugging Face Hub model, downloaded on the first run", "classes": None, "config": None}
    assert time.perf_counter() - started < 5 and not any("bob" in path for _, path in hub.requests)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": constants.HF_HUB_CACHE, "HF_ENDPOINT": hub.url,
           "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "cotexnet.cli", "segment", "--device", "cpu", "--out", str(tmp_path / "offline")]
    done = subprocess.run([*command[:4], "alice/disks", str(image), *command[4:]], env=env, capture_output=True,
                          encoding="utf-8", errors="replace", timeout=300)
    assert done.returncode == 0, done.stderr
    offline = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "offline" / "scan_labels.nrrd")))
    np.testing.assert_array_equal(offline, local_labels)
    done = subprocess.run([*command[:4], "bob/unknown", str(image), *command[4:]], env=env, capture_output=True,
                          encoding="utf-8", errors="replace", timeout=300)
    assert done.returncode == 2 and done.stderr.count("\n") == 1
    assert "bob/unknown: no such local folder, and as a Hub repository it could not be downloaded" in done.stderr
    assert "(HF_HUB_OFFLINE is set)" in done.stderr


def test_a_repo_with_code_or_pickles_is_read_for_its_safetensors_only(hub, tmp_path, tiny_model):
    """A repository that also holds a pickle and Python files: only the safetensors bundle is fetched, nothing runs."""
    from cotexnet import CoTexNet

    folder = tiny_model(classes=("disk",), image_size=32).save_pretrained(tmp_path / "bundle")
    from cotexnet.bundle import push_bundle

    push_bundle(folder, "mallory/model")
    repo = hub.repos["mallory/model"]
    marker = tmp_path / "ran"
    evil = f"open({str(marker)!r}, 'w').write('ran')\n".encode()
    repo["branches"]["main"] = hub.commit(repo, repo["branches"]["main"],
                                          {"modeling_cotexnet.py": evil, "pytorch_model.bin": b"pickle", "x.pt": b"pt"})
    model = CoTexNet.from_pretrained("mallory/model")
    assert model.config.classes == ["disk"] and not marker.exists()
    fetched = {path.rsplit("/", 1)[-1] for method, path in hub.requests if "/resolve/" in path}
    assert not fetched & {"modeling_cotexnet.py", "pytorch_model.bin", "x.pt"}
    snapshot = Path(model.name_or_path) if Path(model.name_or_path).exists() else None
    assert snapshot is None  # it remembers the repo id it was loaded from, which a DICOM SEG names
    assert model.name_or_path == "mallory/model"


def test_slicer_worker_segments_with_a_repo_id_from_the_cache_offline(hub, bundle, scene, monkeypatch):
    """CoTexNetSegment's GUI path: the model field holds ``owner/name``; the worker process loads it from the Hugging
    Face cache with HF_HUB_OFFLINE=1 and gives the labels the local bundle gives. CoTexNetTrain reads its classes."""
    import time

    from huggingface_hub import constants

    from CoTexNetSegmentLib import mrml
    from CoTexNetSegmentLib.logic import CoTexNetSegmentLogic
    from CoTexNetSegmentLib.worker import SegmentationWorker
    from cotexnet import CoTexNet
    from cotexnet.bundle import push_bundle

    push_bundle(bundle, "carol/organs")
    CoTexNet.from_pretrained("carol/organs")  # downloaded once, online
    hub.shutdown()
    hub.server_close()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", constants.HF_HUB_CACHE)
    monkeypatch.setenv("HF_ENDPOINT", hub.url)

    volume = add_volume(scene, phantom())
    worker = SegmentationWorker(command=[sys.executable, "-m", "cotexnet.worker"])
    try:
        logic = CoTexNetSegmentLogic(scene, worker=worker)
        job = logic.startSegmentation(volume, "carol/organs", "cpu", concepts=False)
        deadline = time.monotonic() + 240
        while not job.finished:
            assert time.monotonic() < deadline
            job.poll()
            time.sleep(0.02)
        assert job.state == job.DONE, job.error
    finally:
        worker.stop()
    in_process = logic.segment(volume, str(bundle), "cpu", concepts=False)
    from CoTexNetTrainLib.dataset import modelClasses

    assert modelClasses("carol/organs") == CLASSES  # CoTexNetTrain's "continue from" field takes the repo id too
    from_hub = mrml.segmentationToLabelMap(job.result, volume, CLASSES)
    assert len(np.unique(from_hub)) >= 2
    np.testing.assert_array_equal(from_hub, mrml.segmentationToLabelMap(in_process, volume, CLASSES))

