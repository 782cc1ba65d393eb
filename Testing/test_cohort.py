"""Cohort-scale segmentation (cotexnet/cohort.py): manifests, the split, torchrun with gloo, resume after
SIGKILL, failure isolation, out-of-memory retries and the one report.

Studies are small NIfTI volumes written here and the model is the tiny random backbone at 32 px, so
each case takes seconds; torchrun runs 2 CPU ranks with gloo in a subprocess, with a time limit.
"""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import SimpleITK as sitk
import torch

from cotexnet import CoTexNet, CoTexNetConfig
from cotexnet.cli import main
from cotexnet.cohort import (STATE_FOLDER, Study, expand_inputs, make_studies, read_journals, read_manifest,
                             segment_cohort, split_studies)
from cotexnet.data import read_image
from cotexnet.errors import CoTexNetError

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]  # the torchrun command of this interpreter
SPACING = (0.8, 0.8, 2.0)  # x, y, z mm: a voxel is 1.28 mm³
BROKEN = {4: b"not an image at all", 9: b""}  # study index -> what its file holds


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bundle") / "model"
    CoTexNet.from_config(CoTexNetConfig(classes=["disk", "square"], backbone="tiny", image_size=32)).save_pretrained(folder)
    return folder


def write_cohort(root: Path, count: int = 12, shape=(6, 24, 24), broken=BROKEN) -> Path:
    """``count`` studies (study i has ``shape[0] + i`` slices, so their sizes differ) listed in ``root/cohort.csv``
    with ids; the studies in ``broken`` are files that are not images."""
    rng = np.random.default_rng(0)
    (root / "data").mkdir(parents=True, exist_ok=True)
    lines = ["path,id"]
    for i in range(count):
        path = root / "data" / f"s{i:02d}.nii.gz"
        if i in broken:
            path.write_bytes(broken[i])
        else:
            image = sitk.GetImageFromArray(rng.random((shape[0] + i, *shape[1:])).astype(np.float32))
            image.SetSpacing(SPACING)
            sitk.WriteImage(image, str(path))
        lines.append(f"data/s{i:02d}.nii.gz,case-{i:02d}")
    (root / "cohort.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root / "cohort.csv"


def report_rows(out: Path) -> list[dict]:
    with open(out / "report.csv", newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def done_records(out: Path) -> list[str]:
    """Study names with a "done" record, over every process's journal, one entry per record."""
    names = []
    for path in (out / STATE_FOLDER).glob("journal-*.jsonl"):
        for line in path.read_text(encoding="utf-8").splitlines():
            record = json.loads(line)
            if record["status"] == "done":
                names.append(record["name"])
    return names


# ------------------------------------------------------------------------------------------ manifests
def test_text_and_csv_manifests_list_studies_relative_to_the_manifest(tmp_path):
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "cohort.txt").write_text("# cohort A\n../a.nii.gz\n\n/abs/b.nrrd\n", encoding="utf-8")
    (tmp_path / "lists" / "cohort.csv").write_text("\ufeffid, Path\nP1,../a.nii.gz\n,c.mha\n", encoding="utf-8")
    text = read_manifest(tmp_path / "lists" / "cohort.txt")
    assert [(p, i) for p, i, _ in text] == [(tmp_path / "lists" / "../a.nii.gz", None), (Path("/abs/b.nrrd"), None)]
    table = read_manifest(tmp_path / "lists" / "cohort.csv")
    assert [(p, i) for p, i, _ in table] == [(tmp_path / "lists" / "../a.nii.gz", "P1"), (tmp_path / "lists" / "c.mha", None)]
    assert table[1][2].endswith("cohort.csv line 3")


@pytest.mark.parametrize("content, expected", [
    ("id,file\nP1,a.nii.gz\n", "no 'path' column (found: id, file)"),
    ("path,id\n,P1\n", "line 2: the 'path' field is empty"),
    ("path,id\na.nii.gz,../up\n", "id '../up' cannot name an output file"),
    ("path\n", "lists no studies"),
], ids=["no-path-column", "empty-path", "id-with-slash", "empty"])
def test_a_bad_manifest_is_refused_naming_the_file_and_the_field(tmp_path, content, expected):
    manifest = tmp_path / "cohort.csv"
    manifest.write_text(content, encoding="utf-8")
    with pytest.raises(CoTexNetError) as error:
        read_manifest(manifest)
    assert expected in str(error.value) and str(manifest) in str(error.value)


def test_ids_name_the_outputs_and_clashing_names_are_refused(tmp_path):
    entries = expand_inputs([write_cohort(tmp_path, count=3, broken={})])
    assert [s.name for s in make_studies(entries)] == ["case-00", "case-01", "case-02"]
    clash = [(tmp_path / "data" / "s00.nii.gz", "s01", "a line"), (tmp_path / "data" / "s01.nii.gz", None, "b line")]
    with pytest.raises(CoTexNetError, match="b line: its outputs would be named 's01', as those of a line"):
        make_studies(clash)


def test_globs_expand_sorted_and_a_pattern_matching_nothing_is_an_error(tmp_path):
    write_cohort(tmp_path, count=3, broken={})
    entries = expand_inputs([str(tmp_path / "data" / "s0[12].nii.gz")])
    assert [p.name for p, _, _ in entries] == ["s01.nii.gz", "s02.nii.gz"]
    with pytest.raises(CoTexNetError, match="matches no file"):
        expand_inputs([str(tmp_path / "none*.nii.gz")])


@pytest.mark.parametrize("options, expected", [
    (["--num-parts", "3", "--part-id", "3"], "--part-id: expected 0 to 2 (--num-parts 3), got 3"),
    (["--part-id", "1"], "--part-id: give --num-parts too"),
    (["--num-parts", "0"], "--num-parts: expected a positive integer, got 0"),
    (["--read-ahead", "-1"], "--read-ahead: expected 0 or more, got -1"),
    (["--reference", "truth.nii.gz"], "--reference: give reference label maps with inputs listed one by one"),
    (["--inputs", "missing.csv"], "missing.csv: manifest not found"),
], ids=["part-out-of-range", "part-without-parts", "zero-parts", "negative-read-ahead", "reference", "no-manifest"])
def test_cohort_options_are_checked_with_one_error_line(bundle, tmp_path, capsys, options, expected):
    manifest = write_cohort(tmp_path, count=1, broken={})
    inputs = [] if "--inputs" in options else ["--inputs", str(manifest)]
    code = main(["segment", str(bundle), *inputs, "--out", str(tmp_path / "out"), "--device", "cpu", *options])
    err = capsys.readouterr().err
    assert code == 2 and err.count("error:") == 1 and expected in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()  # refused before any work


# ------------------------------------------------------------------------------------------ the split
def test_the_split_covers_every_study_once_and_balances_bytes():
    sizes = [int(s) for s in np.random.default_rng(3).integers(1, 1000, 57)]
    studies = [Study(i, Path(f"s{i}"), f"s{i}", size, "test") for i, size in enumerate(sizes)]
    for parts in (1, 2, 3, 8):
        shares = split_studies(studies, parts)
        assert sorted(s.index for share in shares for s in share) == list(range(57))
        loads = [sum(s.size for s in share) for share in shares]
        assert max(loads) - min(loads) <= max(sizes)  # the bound of largest-first to the lightest share
        assert all([s.index for s in share] == sorted(s.index for s in share) for share in shares)
        assert split_studies(list(reversed(studies)), parts) == shares  # order of listing does not matter


# ------------------------------------------------------------------------------------------ torchrun
def test_two_gloo_ranks_segment_every_good_study_once_and_report_all_twelve(bundle, tmp_path):
    manifest = write_cohort(tmp_path)
    out = tmp_path / "out"
    command = [*TORCHRUN, "--standalone", "--nproc-per-node", "2",
               "-m", "cotexnet.cli", "segment", str(bundle), "--inputs", str(manifest), "--out", str(out),
               "--device", "cpu"]
    done = subprocess.run(command, env=ENV, capture_output=True, encoding="utf-8", errors="replace", timeout=300)
    assert done.returncode != 0
    assert "2 of 12 studies failed" in done.stderr, done.stderr
    assert "10 done, 0 skipped, 2 failed of 12 studies" in done.stdout and "on 2 process(es)" in done.stdout, done.stdout
    rows = report_rows(out)
    assert [row["id"] for row in rows] == [f"case-{i:02d}" for i in range(12)]
    failed = {int(row["id"][-2:]): row["error"] for row in rows if row["status"] == "failed"}
    assert set(failed) == set(BROKEN) and all(f"s{i:02d}.nii.gz" in failed[i] for i in BROKEN)
    assert {row["status"] for i, row in enumerate(rows) if i not in BROKEN} == {"done"}
    assert sorted(done_records(out)) == [f"case-{i:02d}" for i in range(12) if i not in BROKEN]  # each once
    journals = sorted((out / STATE_FOLDER).glob("journal-*.jsonl"))
    assert [p.name for p in journals] == ["journal-0-of-1-rank-0-of-2.jsonl", "journal-0-of-1-rank-1-of-2.jsonl"]
    assert all('"done"' in p.read_text() for p in journals)  # both ranks segmented a share
    for i, row in enumerate(rows):
        if i not in BROKEN:
            labels = read_image(out / f"case-{i:02d}_labels.nii.gz")
            assert labels.shape == (6 + i, 24, 24) and labels.spacing == pytest.approx(SPACING)
            assert int(row["slices"]) == 6 + i
            assert row["model"] == "model" and row["model_version"].startswith("sha256:")
    report = json.loads((out / "report.json").read_text())
    assert report["summary"]["done"] == 10 and report["summary"]["failed"] == 2 and report["summary"]["processes"] == 2


# ------------------------------------------------------------------------------- --num-parts (Slurm arrays)
def test_three_parts_cover_the_manifest_exactly_once(bundle, tmp_path, capsys):
    manifest = write_cohort(tmp_path)
    out = tmp_path / "out"
    pending, failed = [], [0]
    for part in range(3):
        code = main(["segment", str(bundle), "--inputs", str(manifest), "--out", str(out), "--device", "cpu",
                     "--num-parts", "3", "--part-id", str(part)])
        rows = report_rows(out)
        pending.append(sum(row["status"] == "pending" for row in rows))
        failed.append(sum(row["status"] == "failed" for row in rows))
        assert code == (1 if failed[-1] > failed[-2] else 0)  # a part fails when one of its own studies did
    capsys.readouterr()
    assert pending[0] > pending[1] > pending[2] == 0
    assert sorted(done_records(out)) == [f"case-{i:02d}" for i in range(12) if i not in BROKEN]  # each once
    statuses = [row["status"] for row in report_rows(out)]
    assert statuses == ["failed" if i in BROKEN else "done" for i in range(12)]
    shares = [{json.loads(line)["name"] for line in path.read_text().splitlines()}
              for path in sorted((out / STATE_FOLDER).glob("journal-*.jsonl"))]
    assert len(shares) == 3 and sum(len(s) for s in shares) == 12 and set().union(*shares) == {f"case-{i:02d}" for i in range(12)}


# ------------------------------------------------------------------------------------- resume after SIGKILL
def test_a_killed_run_restarts_where_it_stopped_and_overwrite_redoes_all(bundle, tmp_path, capsys):
    manifest = write_cohort(tmp_path, count=12, shape=(40, 64, 64), broken={})
    out = tmp_path / "out"
    command = [*TORCHRUN, "--standalone", "--nproc-per-node", "2", "-m", "cotexnet.cli", "segment", str(bundle),
               "--inputs", str(manifest), "--out", str(out), "--device", "cpu", "--batch-size", "4"]
    # Preemption: torchrun and both ranks (torchrun starts each in a session of its own) get SIGKILL, mid-run.
    process = subprocess.Popen(command, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while len(done_records(out) if (out / STATE_FOLDER).is_dir() else []) < 3:
        assert process.poll() is None and time.monotonic() < deadline, "the run ended before it could be killed"
        time.sleep(0.01)
    ranks = psutil.Process(process.pid).children(recursive=True)
    for member in [psutil.Process(process.pid), *ranks]:
        member.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    psutil.wait_procs(ranks, timeout=30)
    finished = set(done_records(out))
    assert 3 <= len(finished) < 12, "the run was not cut short: make the studies bigger"
    for labels in out.glob("*_labels.nii.gz"):  # what is in place is whole: written temp-then-rename
        assert read_image(labels).shape[1:] == (64, 64)

    again = subprocess.run(command, env=ENV, capture_output=True, encoding="utf-8", errors="replace", timeout=300)
    assert again.returncode == 0, again.stderr
    assert f"{12 - len(finished)} done, {len(finished)} skipped, 0 failed of 12 studies" in again.stdout, again.stdout
    assert sorted(done_records(out)) == [f"case-{i:02d}" for i in range(12)]  # nothing segmented twice
    rows = report_rows(out)
    assert {row["id"] for row in rows if row["status"] == "skipped"} == finished
    assert not [p for p in out.iterdir() if p.name.startswith(".") and p.name != STATE_FOLDER]  # no staging left
    assert sorted(p.name for p in out.glob("*_labels.nii.gz")) == [f"case-{i:02d}_labels.nii.gz" for i in range(12)]

    before = (out / "case-00_labels.nii.gz").stat().st_mtime_ns
    os.utime(tmp_path / "data" / "s03.nii.gz")  # an input changed since it was segmented is not "done"
    assert main(["segment", str(bundle), "--inputs", str(manifest), "--out", str(out), "--device", "cpu"]) == 1
    assert "case-03_labels.nii.gz: exists already" in capsys.readouterr().err  # and its old output is not replaced
    assert main(["segment", str(bundle), "--inputs", str(manifest), "--out", str(out), "--device", "cpu",
                 "--overwrite"]) == 0
    assert "12 done, 0 skipped, 0 failed" in capsys.readouterr().out
    assert (out / "case-00_labels.nii.gz").stat().st_mtime_ns != before


# ------------------------------------------------------------------------- report contents, memory retries
def _all_disk(model):
    """A model whose head says "disk" everywhere: class 1's bias far above the others."""
    head = [m for m in model.modules() if isinstance(m, torch.nn.ConvTranspose2d)][-1]
    with torch.no_grad():
        head.bias[1] += 50.0
    return model


def test_the_report_gives_volumes_in_ml_and_mean_confidence(bundle, tmp_path):
    manifest = write_cohort(tmp_path, count=3, broken={})
    model = _all_disk(CoTexNet.from_pretrained(bundle))
    report = segment_cohort(model, bundle, [manifest], tmp_path / "out", device="cpu", show_progress=False)
    for i, row in enumerate(report["studies"]):
        voxels = (6 + i) * 24 * 24
        assert row["volume_ml"]["disk"] == pytest.approx(voxels * 0.8 * 0.8 * 2.0 / 1000.0, abs=1e-3)
        assert row["volume_ml"]["square"] == 0.0
        assert 0.99 < row["mean_confidence"]["disk"] <= 1.0 and row["mean_confidence"]["square"] is None
    table = report_rows(tmp_path / "out")
    assert float(table[0]["volume_ml:disk"]) == pytest.approx(6 * 24 * 24 * 1.28e-3, abs=1e-3)


def test_out_of_memory_retries_the_study_with_half_the_batch(bundle, tmp_path, monkeypatch):
    manifest = write_cohort(tmp_path, count=2, broken={})
    model = CoTexNet.from_pretrained(bundle)
    forward = model.forward
    seen = []

    def forward_with_little_memory(images, *args, **kwargs):
        seen.append(len(images))
        if len(images) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return forward(images, *args, **kwargs)

    monkeypatch.setattr(model, "forward", forward_with_little_memory)
    report = segment_cohort(model, bundle, [manifest], tmp_path / "out", device="cpu", batch_size=8,
                            read_ahead=0, show_progress=False)
    assert [row["status"] for row in report["studies"]] == ["done", "done"]
    assert [row["batch_size"] for row in report["studies"]] == [2, 2]
    assert seen[:3] == [6, 4, 2]  # the first study's 6 slices, then half, then half again

    monkeypatch.setattr(model, "forward", lambda images, *a, **k: (_ for _ in ()).throw(torch.OutOfMemoryError("OOM")))
    report = segment_cohort(model, bundle, [manifest], tmp_path / "out2", device="cpu", batch_size=4,
                            show_progress=False)
    assert all("out of memory even with a batch of one slice" in row["error"] for row in report["studies"])
    assert not list((tmp_path / "out2").glob("*_labels*"))


# ------------------------------------------------------------------------------------------ Slicer console
def test_slicer_segment_files_with_a_report(bundle, tmp_path):
    slicer = pytest.importorskip("slicer")
    from CoTexNetSegmentLib.logic import CoTexNetSegmentLogic

    manifest = write_cohort(tmp_path, count=4, broken={2: b"junk"})
    logic = CoTexNetSegmentLogic(slicer.vtkMRMLScene())
    rows = logic.segmentFiles([manifest], bundle, tmp_path / "out", device="cpu", report=True)
    assert [row["status"] for row in rows] == ["done", "done", "failed", "done"]
    assert "s02.nii.gz" in rows[2]["error"] and Path(rows[0]["outputs"][0]).is_file()
    assert [row["status"] for row in report_rows(tmp_path / "out")] == ["done", "done", "failed", "done"]
    again = logic.segmentFiles([manifest], bundle, tmp_path / "out", device="cpu", report=True)
    assert [row["status"] for row in again] == ["skipped", "skipped", "failed", "skipped"]


def test_a_journal_line_cut_by_a_kill_is_ignored_and_the_next_record_stands(tmp_path):
    from cotexnet.cohort import Journal

    study = Study(0, tmp_path / "a.nii.gz", "a", 1, "test")
    journal = Journal(tmp_path, "0-of-1-rank-0-of-1", "run1")
    journal.append(study, "done", row={"id": "a"})
    with open(journal.path, "a", encoding="utf-8") as handle:
        handle.write('{"name": "a", "status": "sta')  # killed in the middle of a write
    assert read_journals(tmp_path)["a"]["status"] == "done"
    Journal(tmp_path, "0-of-1-rank-0-of-1", "run2").append(study, "failed", error="x")
    assert read_journals(tmp_path)["a"]["status"] == "failed"
