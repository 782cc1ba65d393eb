"""Cohort-scale segmentation: a manifest of studies, split over processes and machines, resumable, one report.

Every study goes through :func:`cotexnet.infer.segment_file`, the engine's one way to segment a file; this
module only decides which process segments what, keeps the device busy and remembers what was done:

- **Inputs**: image files, DICOM folders, glob patterns, and manifests (``.txt``/``.lst``/``.list``: one path
  per line; ``.csv``: a ``path`` column and an optional ``id`` column naming the outputs). Relative paths
  in a manifest are relative to the manifest's folder.
- **Split**: studies are dealt to ``parts`` shares, largest file first to the lightest share, so every
  share holds about the same bytes; the split depends only on the manifest and the file sizes, so every
  process computes the same one. The shares are torch.distributed ranks under ``torchrun`` times the
  ``--num-parts`` of a scheduler's array job.
- **Pipeline**: ``read_ahead`` studies are read (and their outputs written) on background threads while
  one is segmented; the model runs one batch at a time, and the time it runs is the busy share.
- **Resume**: each process appends to its own journal (``OUT/.cotexnet-cohort/journal-*.jsonl``, one JSON
  object per line, flushed and fsynced). A study whose last record says done, with the same input file
  (size, modification time), the same model weights and settings, and its outputs still in place with
  their recorded sizes, is skipped. A study cut short by a kill is redone after its own partial outputs
  are removed (outputs are written temp-then-rename, so none is ever half written).
- **Failures** are recorded per study and the rest goes on; out of memory retries the study with half the
  batch until a batch of one.
- **Report**: ``OUT/report.csv`` and ``OUT/report.json`` list every study of the manifest (done, skipped,
  failed, or pending while another share has not finished), merged under a lock by whichever process
  finishes last.
"""
from __future__ import annotations

import csv
import glob
import hashlib
import io
import json
import os
import shutil
import threading
import time
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch

from . import __version__
from .atomic import write_json_atomic, write_text_atomic
from .bundle import WEIGHTS_NAME, bundle_folder
from .data.image import image_suffix
from .dicom_seg import seg_path as dicom_seg_path
from .errors import Cancelled, CoTexNetError, DataError
from .infer import check_output_folder, output_paths, output_stems, probability_paths, resolve_device, segment_file
from .runlock import RunLock, RunLockedError

MANIFEST_SUFFIXES = (".csv", ".txt", ".lst", ".list")
STATE_FOLDER = ".cotexnet-cohort"
REPORT_CSV, REPORT_JSON = "report.csv", "report.json"
#: Options that change what is written; a study done with other values is not "done" for this run.
RESULT_SETTINGS = ("seg_nrrd", "dicom_seg", "probabilities", "axis", "planes", "tta", "postprocess", "precision", "confidence")
STATUSES = ("done", "skipped", "failed", "pending")


@dataclass(frozen=True)
class Study:
    """One input of the cohort: its position in the manifest, its file, the name of its outputs."""

    index: int
    path: Path
    name: str
    size: int
    source: str  # where it was listed, for messages
    duplicate_of: int | None = None


# ------------------------------------------------------------------------------------------- inputs
def read_manifest(path: str | os.PathLike) -> list[tuple[Path, str | None, str]]:
    """``(path, id or None, "manifest line N")`` per study listed in a text or CSV manifest."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise DataError("a manifest is UTF-8 text (one path per line, or CSV with a 'path' column)", path) from None
    except OSError as error:
        raise DataError(f"cannot read the manifest ({error.strerror or error})", path) from None
    base = path.parent
    entries = []
    if image_suffix(path) == ".csv":
        rows = csv.DictReader(io.StringIO(text))
        columns = [c.strip().lower() for c in rows.fieldnames or []]
        if "path" not in columns:
            raise DataError(f"the CSV header has no 'path' column (found: {', '.join(columns) or 'nothing'})", path)
        rows.fieldnames = columns
        for row in rows:
            line = f"{path} line {rows.line_num}"
            value, name = (row.get("path") or "").strip(), (row.get("id") or "").strip() or None
            if not value:
                raise DataError(f"line {rows.line_num}: the 'path' field is empty", path)
            entries.append((base / value, _checked_id(name, line), line))
    else:
        for number, line in enumerate(text.splitlines(), start=1):
            value = line.strip()
            if value and not value.startswith("#"):
                entries.append((base / value, None, f"{path} line {number}"))
    if not entries:
        raise DataError("the manifest lists no studies", path)
    return entries


def _checked_id(name: str | None, where: str) -> str | None:
    if name is not None and (name in (".", "..") or any(ch in name for ch in "/\\\0") or not name.isprintable()):
        raise CoTexNetError(f"{where}: id {name!r} cannot name an output file (no '/', '\\', '.', '..' or "
                            f"control characters)")
    return name


def expand_inputs(items: Sequence[str | os.PathLike]) -> list[tuple[Path, str | None, str]]:
    """Manifests, glob patterns (sorted), image files and DICOM folders → ``(path, id, source)`` per study."""
    entries = []
    for item in items:
        path = Path(item)
        if image_suffix(path) in MANIFEST_SUFFIXES:
            if not path.is_file():
                raise DataError("manifest not found", path)
            entries.extend(read_manifest(path))
        elif not path.exists() and glob.has_magic(str(item)):
            matches = sorted(glob.glob(str(item)))
            if not matches:
                raise CoTexNetError(f"{item}: the pattern matches no file")
            entries.extend((Path(match), None, str(item)) for match in matches)
        else:
            entries.append((path, None, str(item)))
    return entries


def _input_size(path: Path) -> int:
    """Bytes on disk: the file's, or the sum of a DICOM folder's files (0 when it cannot be read)."""
    try:
        if path.is_dir():
            return sum(entry.stat().st_size for entry in os.scandir(path) if entry.is_file())
        return path.stat().st_size
    except OSError:
        return 0


def make_studies(entries: Sequence[tuple[Path, str | None, str]]) -> list[Study]:
    """Studies with output names that no two share: the ``id`` where the manifest gives one, else the
    engine's :func:`~cotexnet.infer.output_stems`. A file listed twice is segmented once; its second
    listing fails on its own."""
    entries = [(Path(os.path.abspath(path)), name, source) for path, name, source in entries]  # the same from any folder
    paths = [path for path, _, _ in entries]
    names = [name or stem for (_, name, _), stem in zip(entries, output_stems(paths))]
    seen: dict[str, int] = {}
    first: dict[str, int] = {}
    studies = []
    for index, ((path, _, source), name) in enumerate(zip(entries, names)):
        key = os.path.abspath(path)
        duplicate = first.setdefault(key, index)
        duplicate = None if duplicate == index else duplicate
        if duplicate is None and name.casefold() in seen:
            other = entries[seen[name.casefold()]][2]
            raise CoTexNetError(f"{source}: its outputs would be named {name!r}, as those of {other}; give each "
                                f"study its own id")
        seen.setdefault(name.casefold(), index)
        studies.append(Study(index, path, name, _input_size(path), source, duplicate))
    return studies


def split_studies(studies: Sequence[Study], parts: int) -> list[list[Study]]:
    """``parts`` shares of about equal bytes: largest study first, each to the share holding the fewest
    bytes so far (the lowest-numbered on ties); each share in manifest order. Deterministic."""
    shares: list[list[Study]] = [[] for _ in range(parts)]
    loads = [0] * parts
    for study in sorted(studies, key=lambda s: (-s.size, s.index)):
        share = min(range(parts), key=lambda p: (loads[p], p))
        shares[share].append(study)
        loads[share] += study.size
    return [sorted(share, key=lambda s: s.index) for share in shares]


def check_share(num_parts: int, part_id: int) -> None:
    if num_parts < 1:
        raise CoTexNetError(f"--num-parts: expected a positive integer, got {num_parts}")
    if not 0 <= part_id < num_parts:
        raise CoTexNetError(f"--part-id: expected 0 to {num_parts - 1} (--num-parts {num_parts}), got {part_id}")


# ------------------------------------------------------------------------------------------ journal
def _fingerprint(path: Path) -> dict:
    """What identifies the content of an input without reading it: its size and modification time."""
    try:
        if path.is_dir():
            stats = [entry.stat() for entry in os.scandir(path) if entry.is_file()]
            return {"size": sum(s.st_size for s in stats), "mtime_ns": max((s.st_mtime_ns for s in stats), default=0)}
        stat = path.stat()
        return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    except OSError:
        return {}


def read_journals(state: Path) -> dict[str, dict]:
    """The latest record per study name over every process's journal; a line cut by a kill is ignored."""
    latest: dict[str, dict] = {}
    for path in sorted(state.glob("journal-*.jsonl")):
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                record = json.loads(line)
                name, stamp = record["name"], record["time"]
            except (ValueError, KeyError, TypeError):
                continue
            if name not in latest or stamp >= latest[name]["time"]:
                latest[name] = record
    return latest


class Journal:
    """This process's append-only record of what it started, finished and skipped."""

    def __init__(self, state: Path, label: str, run: str):
        self.path, self.run = state / f"journal-{label}.jsonl", run
        self._lock = threading.Lock()
        if self.path.is_file() and self.path.stat().st_size:
            with open(self.path, "rb+") as handle:  # a line a kill cut short is ended, so the next one stands alone
                handle.seek(-1, os.SEEK_END)
                if handle.read(1) != b"\n":
                    handle.write(b"\n")

    def append(self, study: Study, status: str, **fields) -> None:
        record = {"name": study.name, "input": str(study.path), "status": status, "run": self.run,
                  "time": time.time(), **fields}
        line = json.dumps(record, default=str) + "\n"
        with self._lock, open(self.path, "a", encoding="utf-8") as handle:
            handle.write(line)
            handle.flush()
            os.fsync(handle.fileno())


def _outputs_intact(record: dict) -> bool:
    sizes = record.get("output_sizes") or {}
    return bool(sizes) and all(Path(p).is_file() and Path(p).stat().st_size == size for p, size in sizes.items())


# ------------------------------------------------------------------------------------------- model
def model_identity(model_path: str | os.PathLike) -> tuple[str, str]:
    """(name, version) of a bundle for the report: its folder (``run/best`` for a run) and its weights' sha256."""
    folder = bundle_folder(model_path).resolve()
    name = f"{folder.parent.name}/{folder.name}" if folder.name in ("best", "last") else folder.name
    digest = hashlib.sha256()
    with open(folder / WEIGHTS_NAME, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 24), b""):
            digest.update(block)
    return name, f"sha256:{digest.hexdigest()[:16]}"


class TimedModel:
    """The model as :func:`~cotexnet.infer.predict_volume` sees it: one batch at a time whichever thread
    calls, and the seconds spent in it (the device's work included, on CUDA) counted for the busy share."""

    def __init__(self, model, device: torch.device):
        self._model, self._device = model, device
        self._lock = threading.Lock()
        self.busy_seconds = 0.0

    def __getattr__(self, name):
        return getattr(self._model, name)

    def __call__(self, images):
        with self._lock:
            started = time.perf_counter()
            logits = self._model(images)
            if self._device.type == "cuda":
                torch.cuda.synchronize(self._device)
            self.busy_seconds += time.perf_counter() - started
        return logits


# ------------------------------------------------------------------------------------------ runner
@dataclass
class PartResult:
    """What one process did: its rows (one per study of its share) and its timing."""

    rows: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    busy_seconds: float | None = None

    def count(self, status: str) -> int:
        return sum(row["status"] == status for row in self.rows)


def _is_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, (torch.OutOfMemoryError, MemoryError))


def _remove_staging(output: Path) -> None:
    """Temporary folders a killed write left next to ``output`` (see :mod:`cotexnet.atomic`)."""
    for leftover in output.parent.glob(f".{glob.escape(output.name)}.*"):
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)


class CohortRunner:
    """Segments one share of a cohort with one loaded model; see the module docstring."""

    def __init__(self, model, model_path, out_dir, *, overwrite: bool = False, read_ahead: int = 2,
                 confidence: bool = True, seg_nrrd: bool = True, dicom_seg: bool = False, probabilities: str | None = None,
                 **options):
        self.out = Path(os.path.abspath(out_dir))
        check_output_folder(self.out)
        self.state = self.out / STATE_FOLDER
        self.model_name, self.model_version = model_identity(model_path)
        self.classes = list(model.config.classes)
        self.device = options["device"] = resolve_device(options.get("device", "auto"))
        self.compiled = options.get("compile") is not None
        # A compiled model (CUDA graphs) stays on one thread: no reading ahead, no proxy around it.
        self.model = model if self.compiled else TimedModel(model, self.device)
        self.workers = 1 if self.compiled else 1 + max(0, read_ahead)
        self.overwrite = overwrite
        self.outputs = dict(seg_nrrd=seg_nrrd, dicom_seg=dicom_seg, probabilities=probabilities, confidence=confidence)
        self.options = options
        settings = {**options, **self.outputs}
        self.settings = {key: settings.get(key) for key in RESULT_SETTINGS}

    def output_files(self, study: Study) -> list[Path]:
        labels, seg = output_paths(study.path, self.out, study.name)
        probabilities = self.outputs["probabilities"]
        return [labels, *([seg] if self.outputs["seg_nrrd"] else []),
                *([dicom_seg_path(self.out, study.name)] if self.outputs["dicom_seg"] else []),
                *(probability_paths(study.path, self.out, self.classes, study.name) if probabilities else [])]

    def run(self, share: Sequence[Study], label: str, run_id: str, progress=None) -> PartResult:
        """Segment ``share``; ``label`` names this process's journal, ``run_id`` marks this run's records."""
        self.state.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        with RunLock(self.state / f"lock-{label}"):
            journal = Journal(self.state, label, run_id)
            earlier = read_journals(self.state)
            rows: dict[int, dict] = {}
            todo = []
            for study in share:
                record = earlier.get(study.name)
                if self._is_done(study, record):
                    rows[study.index] = {**record["row"], "status": "skipped", "error": ""}
                    journal.append(study, "skipped", row=rows[study.index], fingerprint=record["fingerprint"],
                                   settings=record["settings"], output_sizes=record["output_sizes"])
                else:
                    if record is not None and record["status"] == "started":
                        self._undo(study, record)
                    todo.append(study)
            if progress is not None:
                progress(len(rows))
            with ThreadPoolExecutor(self.workers, thread_name_prefix="cohort") as pool:
                futures = {pool.submit(self._segment, study, journal): study for study in todo}
                try:
                    for future in as_completed(futures):
                        rows[futures[future].index] = future.result()
                        if progress is not None:
                            progress(1)
                except BaseException:
                    for future in futures:
                        future.cancel()
                    raise
        busy = None if self.compiled else self.model.busy_seconds
        return PartResult([rows[s.index] for s in share], time.perf_counter() - started, busy)

    def _is_done(self, study: Study, record: dict | None) -> bool:
        return (not self.overwrite and record is not None and record["status"] in ("done", "skipped")
                and record.get("input") == str(study.path) and record.get("fingerprint") == _fingerprint(study.path)
                and record.get("settings") == {**self.settings, "model_version": self.model_version}
                and _outputs_intact(record))

    def _undo(self, study: Study, record: dict) -> None:
        """Remove what an attempt cut short by a kill wrote for ``study`` (never a file that was there before)."""
        before = set(record.get("preexisting", []))
        for output in self.output_files(study):
            _remove_staging(output)
            if str(output) not in before:
                output.unlink(missing_ok=True)

    def _row(self, study: Study, status: str, error: str = "", seconds: float = 0.0, **fields) -> dict:
        return {"id": study.name, "input": str(study.path), "status": status, "error": error,
                "seconds": round(seconds, 3), "slices": 0, "batch_size": None, "outputs": [],
                "volume_ml": {}, "mean_confidence": {}, "model": self.model_name,
                "model_version": self.model_version, **fields}

    def _segment(self, study: Study, journal: Journal) -> dict:
        started = time.perf_counter()
        if study.duplicate_of is not None:
            error = f"{study.source}: {study.path} is listed twice (also as study {study.duplicate_of + 1}); segmented once"
            journal.append(study, "failed", error=error)
            return self._row(study, "failed", error)
        outputs = self.output_files(study)
        preexisting = [str(p) for p in outputs if p.exists()]
        journal.append(study, "started", preexisting=preexisting)
        slices = [0]
        batch_size = self.options.get("batch_size", 16)
        while True:
            try:
                result = segment_file(self.model, study.path, self.out, stem=study.name, overwrite=self.overwrite,
                                      progress=lambda done, total: slices.__setitem__(0, done),
                                      **self.outputs, **{**self.options, "batch_size": batch_size})
                break
            except Cancelled:
                raise
            except Exception as error:  # noqa: BLE001 - a study's failure is recorded and the cohort goes on
                if _is_out_of_memory(error) and batch_size > 1:  # the same study again with half the batch
                    if self.device.type == "cuda":
                        torch.cuda.empty_cache()
                    batch_size //= 2
                    continue
                for output in outputs:  # this attempt's partial outputs go; a file that was there stays
                    if str(output) not in preexisting:
                        output.unlink(missing_ok=True)
                message = str(error) if str(study.path) in str(error) else f"{study.path}: {error}"
                if _is_out_of_memory(error):
                    message = f"{study.path}: out of memory even with a batch of one slice ({error})"
                journal.append(study, "failed", error=message)
                return self._row(study, "failed", message, time.perf_counter() - started, batch_size=batch_size)
        written = [result["labels"], *([result["segmentation"]] if "segmentation" in result else []),
                   *([result["dicom_seg"]["path"]] if "dicom_seg" in result else []),
                   *result.get("probabilities", {}).values()]
        voxel_ml = float(np.prod(result["spacing"])) / 1000.0 if len(result["spacing"]) == 3 else None
        row = self._row(study, "done", seconds=time.perf_counter() - started, slices=slices[0], batch_size=batch_size,
                        outputs=written, mean_confidence=result.get("mean_confidence", {}),
                        volume_ml={name: None if voxel_ml is None else round(count * voxel_ml, 3)
                                   for name, count in result["voxels"].items()})
        journal.append(study, "done", row=row, fingerprint=_fingerprint(study.path),
                       settings={**self.settings, "model_version": self.model_version},
                       output_sizes={path: Path(path).stat().st_size for path in written})
        return row


# ------------------------------------------------------------------------------------------ report
def _csv_rows(rows: Sequence[dict], classes: Sequence[str]) -> str:
    columns = ["id", "input", "status", "error", "seconds", "slices", "batch_size", "outputs", "model", "model_version",
               *(f"volume_ml:{c}" for c in classes), *(f"mean_confidence:{c}" for c in classes)]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        flat = {**row, "outputs": ";".join(row.get("outputs", []))}
        for name in classes:
            flat[f"volume_ml:{name}"] = row.get("volume_ml", {}).get(name)
            confidence = row.get("mean_confidence", {}).get(name)
            flat[f"mean_confidence:{name}"] = None if confidence is None else round(confidence, 4)
        writer.writerow(flat)
    return buffer.getvalue()


def write_report(out_dir: Path, studies: Sequence[Study], part_rows: dict[int, dict], classes: Sequence[str],
                 summary: dict) -> dict:
    """``report.csv`` and ``report.json`` over every study of the manifest; a study no share has reported
    yet is ``pending``. Returns the report's content."""
    rows = [part_rows.get(s.index) or {"id": s.name, "input": str(s.path), "status": "pending", "error": ""}
            for s in studies]
    counts = {status: sum(row["status"] == status for row in rows) for status in STATUSES}
    report = {"cotexnet": __version__, "summary": {**counts, "studies": len(rows), **summary}, "studies": rows}
    write_text_atomic(out_dir / REPORT_CSV, _csv_rows(rows, classes))
    write_json_atomic(out_dir / REPORT_JSON, report)
    return report


def merge_report(out_dir: Path, studies: Sequence[Study], job: tuple[int, int], rows: Sequence[dict],
                 classes: Sequence[str], summary: dict) -> dict:
    """Save this job part's rows and rewrite the report from every part's rows, one process at a time."""
    state = Path(out_dir) / STATE_FOLDER
    part, parts = job
    write_json_atomic(state / f"rows-{part}-of-{parts}.json", list(rows))
    deadline = time.monotonic() + 600
    while True:
        try:
            lock = RunLock(state / "report-lock").acquire()
            break
        except RunLockedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    try:
        by_name = {}
        for path in sorted(state.glob(f"rows-*-of-{parts}.json")):
            by_name.update({row["id"]: row for row in json.loads(path.read_text(encoding="utf-8"))})
        merged = {s.index: by_name[s.name] for s in studies if s.name in by_name and by_name[s.name]["input"] == str(s.path)}
        return write_report(Path(out_dir), studies, merged, classes, summary)
    finally:
        lock.release()


# ------------------------------------------------------------------------------------- distributed
def distributed_rank() -> tuple[int, int]:
    """(rank, world size) under torchrun, joining a gloo group whose only collectives are at the start (the
    run's id) and the end (the rows): a long timeout, as shares may take hours longer than each other."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo", timeout=timedelta(days=7))
    return dist.get_rank(), world


def _broadcast(value, world: int):
    if world <= 1:
        return value
    import torch.distributed as dist

    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def _gather(value, world: int) -> list:
    if world <= 1:
        return [value]
    import torch.distributed as dist

    gathered = [None] * world
    dist.all_gather_object(gathered, value)
    return gathered


class _Progress:
    """A bar over the whole job part: this process's studies as they finish, and (rank 0) the other ranks'
    from their journals, read every second."""

    def __init__(self, total: int, state: Path, label: str, run_id: str, show: bool, poll_others: bool):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, desc="segmenting", unit="study", disable=not show)
        self.state, self.label, self.run_id, self.own, self.others = state, label, run_id, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True) if show and poll_others else None
        if self._thread is not None:
            self._thread.start()

    def __call__(self, count: int) -> None:
        self.own += count
        self._refresh()

    def _refresh(self) -> None:
        self.bar.n = self.own + self.others
        self.bar.refresh()

    def _poll(self) -> None:
        while not self._stop.wait(1.0):
            self._count_others()

    def _count_others(self) -> None:
        finished = 0
        for path in self.state.glob("journal-*.jsonl"):
            if path.name != f"journal-{self.label}.jsonl":
                text = path.read_text(encoding="utf-8", errors="replace")
                finished += sum(f'"run": "{self.run_id}"' in line and '"status": "started"' not in line
                                for line in text.splitlines())
        self.others = finished
        self._refresh()

    def close(self) -> None:
        """Stop polling; called once every rank has finished, so the bar shows their last studies too."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._count_others()
        self.bar.close()


def segment_cohort(model, model_path, inputs: Sequence[str | os.PathLike], out_dir, *, num_parts: int = 1,
                   part_id: int = 0, show_progress: bool = True, **options) -> dict:
    """Segment this process's share of ``inputs`` (see the module docstring) and return the report as
    merged so far: rank 0 (or the single process) returns the report over every study; other ranks their
    own rows. ``options`` go to :class:`CohortRunner` (and through it to :func:`~cotexnet.infer.segment_file`)."""
    check_share(num_parts, part_id)
    studies = make_studies(expand_inputs(inputs))
    rank, world = distributed_rank()
    runner = CohortRunner(model, model_path, out_dir, **options)
    job_share = split_studies(studies, num_parts)[part_id]
    share = split_studies(job_share, world)[rank]
    label = f"{part_id}-of-{num_parts}-rank-{rank}-of-{world}"
    run_id = _broadcast(uuid.uuid4().hex, world)
    runner.state.mkdir(parents=True, exist_ok=True)
    progress = _Progress(len(job_share) if rank == 0 else len(share), runner.state, label, run_id,
                         show_progress and rank == 0, poll_others=world > 1)
    try:
        result = runner.run(share, label, run_id, progress)
        gathered = _gather({"rows": result.rows, "seconds": result.seconds, "busy": result.busy_seconds}, world)
    finally:
        progress.close()
    if world > 1:  # every rank leaves the group together: one closing its connections while another still
        import torch.distributed as dist  # reads them can abort that one in gloo's C++ ("terminate called")

        dist.barrier()
        dist.destroy_process_group()
    if rank != 0:
        return {"summary": {s: result.count(s) for s in STATUSES}, "studies": result.rows}
    rows = [row for part in gathered for row in part["rows"]]
    seconds = max(part["seconds"] for part in gathered)
    done = sum(row["status"] == "done" for row in rows)
    busy = [part["busy"] for part in gathered]
    summary = {"seconds": round(seconds, 3), "processes": world, "part": f"{part_id} of {num_parts}",
               "studies_per_hour": round(done * 3600.0 / seconds, 1) if seconds > 0 else None,
               "slices_per_second": round(sum(row.get("slices", 0) for row in rows if row["status"] == "done")
                                          / seconds, 1) if seconds > 0 else None,
               "busy_share": (round(sum(busy) / (seconds * world), 3) if None not in busy and seconds > 0 else None),
               "device": runner.device.type, "model": runner.model_name, "model_version": runner.model_version}
    report = merge_report(runner.out, studies, (part_id, num_parts), rows, runner.classes, summary)
    report["this_part"] = {status: sum(row["status"] == status for row in rows) for status in STATUSES[:3]}
    return report


# ---------------------------------------------------------------------------------------------- CLI
def run_command(args, options: dict) -> int:
    """``cotexnet segment`` as a cohort: segment this process's share, print the failures and one summary line
    (rank 0 for every rank), exit 1 when a study failed."""
    import sys

    from .model import CoTexNet

    if args.reference:
        raise CoTexNetError("--reference: give reference label maps with inputs listed one by one, not in a cohort run "
                            "(--inputs, --num-parts or torchrun)")
    if args.part_id is not None and args.num_parts is None:
        raise CoTexNetError("--part-id: give --num-parts too")
    check_share(1 if args.num_parts is None else args.num_parts, args.part_id or 0)
    if args.read_ahead < 0:
        raise CoTexNetError(f"--read-ahead: expected 0 or more, got {args.read_ahead}")
    inputs = [*args.inputs, *(args.cohort_inputs or [])]
    if not inputs:
        raise CoTexNetError("no inputs: give image files, DICOM folders or --inputs LIST")
    check_output_folder(Path(args.out))
    rank, world = distributed_rank()
    device = resolve_device(options["device"])
    if device.type == "cuda" and world > 1 and device.index is None:  # torchrun: one GPU per local rank
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
        torch.cuda.set_device(device)
    model = CoTexNet.from_pretrained(args.model, device=device)
    report = segment_cohort(model, args.model, inputs, args.out, num_parts=args.num_parts or 1,
                            part_id=args.part_id or 0, show_progress=not args.json, overwrite=args.overwrite,
                            read_ahead=args.read_ahead, confidence=not args.no_confidence,
                            seg_nrrd=not args.no_seg_nrrd, dicom_seg=args.dicom_seg, probabilities=args.probabilities,
                            **{**options, "device": device})
    if rank != 0:
        return 1 if report["summary"]["failed"] else 0
    part, summary = report["this_part"], report["summary"]
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    else:
        for row in report["studies"]:
            if row["status"] == "failed":
                print(f"FAILED  {row['error']}", file=sys.stderr)
        print(summary_line(part, summary, Path(args.out) / REPORT_CSV))
    if part["failed"]:
        print(f"cotexnet segment: {part['failed']} of {sum(part.values())} studies failed; see "
              f"{Path(args.out) / REPORT_CSV}", file=sys.stderr)
        return 1
    return 0


def summary_line(part: dict, summary: dict, report: Path) -> str:
    """done, skipped, failed; studies/hour, slices/s and the busy share; where the report is."""
    speed = ""
    if part["done"] and summary.get("studies_per_hour") is not None:
        speed = f": {summary['studies_per_hour']:.0f} studies/hour, {summary['slices_per_second']:.1f} slices/s"
        if summary.get("busy_share") is not None:
            speed += f", {'GPU' if summary['device'] == 'cuda' else 'model'} busy {summary['busy_share']:.0%}"
    pending = f", {summary['pending']} pending in other parts" if summary.get("pending") else ""
    return (f"{part['done']} done, {part['skipped']} skipped, {part['failed']} failed of {sum(part.values())} studies "
            f"in {summary['seconds']:.1f} s on {summary['processes']} process(es){speed}{pending}; report {report}")
