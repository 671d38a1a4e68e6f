"""The one entry point that turns a silo directory into training images:
walk the tree, decode each file (`dicom`, `fundus`), attach labels, report
what was skipped, and cache the result in the site's work volume.

The silo itself is only ever opened for reading. The cache is a memory-mapped
``.npy`` of uint8 images keyed by the silo's path, every file's size and
mtime, and the options' digest: change a file or an option and it is rebuilt.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import multiprocessing
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from fedgan.atomic import write_atomic, write_text_atomic
from fedgan.silo.dicom import decode_dicom_file
from fedgan.silo.fundus import EXTENSIONS, decode_fundus_file
from fedgan.silo.labels import GRADES, LabelIndex, dicom_labels, fundus_labels
from fedgan.silo.options import SiloError, SiloOptions
from fedgan.silo.report import SiloReport, SkipFile, content_warnings
from fedgan.silo.resize import fit_square

Progress = Callable[[int, int], None]
# Below this many files a pool's start-up costs more than it saves.
PARALLEL_MIN_FILES = 200


@dataclass
class SiloData:
    images: np.ndarray  # uint8 N×C×H×W, possibly memory-mapped
    labels: list[str | None]
    report: SiloReport
    # Per image, the key a site's CSVs use for its file: the file name
    # without extension (fundus) or the path relative to the silo (DICOM).
    keys: list[str] = dataclasses.field(default_factory=list)

    def as_float(self) -> np.ndarray:
        """float32 in [-1, 1], the range the GAN trains in."""
        return np.asarray(self.images, dtype=np.float32) / 127.5 - 1.0

    def require_images(self, name: str) -> SiloData:
        """Refuse a silo with nothing usable. The message names ``name``, the
        kinds of skip reason (never a file name: it may travel to the
        aggregator in an error reply) and the fix."""
        if self.report.images == 0:
            reasons = sorted({reason for _, reason in self.report.skipped})[:3]
            why = f": {'; '.join(reasons)}" if reasons else ""
            raise SiloError(
                f"{name} holds no usable {self.report.kind} image "
                f"({len(self.report.skipped)} files skipped{why}); run `fedgan silo check` on it"
            )
        return self


def list_files(directory: Path) -> list[Path]:
    if not directory.is_dir():
        raise SiloError(f"{directory} is not a directory; point the site's data dir at its silo")
    return sorted(
        p
        for p in directory.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(directory).parts)
    )


def _gray_to_channels(gray: np.ndarray, channels: int) -> np.ndarray:
    return np.repeat(gray[None], channels, axis=0)


def _rgb_to_channels(rgb: np.ndarray, channels: int) -> np.ndarray:
    if channels == 3:
        return rgb.transpose(2, 0, 1)
    luma = rgb.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    return np.clip(np.rint(luma), 0, 255).astype(np.uint8)[None]


def _resize_u8(frame: np.ndarray, size: int) -> np.ndarray:
    return np.asarray(fit_square(Image.fromarray(frame), size))


@dataclass(frozen=True)
class Decoded:
    """What one file yields; computed in a worker process, so plain data."""

    images: list[np.ndarray]  # C×H×W uint8 at the training size
    size: str
    modality: str | None
    sop_instance_uid: str
    tag_label: str | None
    sop_class: str | None = None


def decode_file(path: Path, opts: SiloOptions) -> Decoded:
    """One file to training images at ``opts.image_size``, or `SkipFile`."""
    if opts.kind == "fundus":
        rgb = decode_fundus_file(path, opts.image_size, opts.fundus_contrast)
        with Image.open(path) as img:  # header only: the original size
            size = f"{img.width}x{img.height}"
        return Decoded([_rgb_to_channels(rgb, opts.channels)], size, None, "", None)
    dcm = decode_dicom_file(path, opts)
    images = [
        _gray_to_channels(_resize_u8(frame, opts.image_size), opts.channels) for frame in dcm.frames
    ]
    size = f"{dcm.columns}x{dcm.rows}"
    return Decoded(images, size, dcm.modality, dcm.sop_instance_uid, dcm.tag_label, dcm.sop_class)


def _decode_or_reason(job: tuple[Path, SiloOptions]) -> Decoded | str:
    try:
        return decode_file(*job)
    except SkipFile as skip:
        return str(skip)


def _decode_all(jobs: list[tuple[Path, SiloOptions]], workers: int) -> Iterator[Decoded | str]:
    """Decode in order; in worker processes when the silo is big enough for
    the pool's start-up (a second or so) to pay off."""
    if workers <= 1 or len(jobs) < PARALLEL_MIN_FILES:
        yield from map(_decode_or_reason, jobs)
        return
    # spawn, not fork: the ClientApp process may hold torch's threads.
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        yield from pool.map(_decode_or_reason, jobs, chunksize=16)


def default_workers() -> int:
    return max(1, min(os.cpu_count() or 1, 8))


def read_silo(
    directory: Path,
    opts: SiloOptions,
    files: list[Path] | None = None,
    progress: Progress | None = None,
    workers: int | None = None,
) -> SiloData:
    """Decode every usable image; uncached. See `load_silo`."""
    directory = Path(directory)
    files = list_files(directory) if files is None else files
    index = fundus_labels(directory) if opts.kind == "fundus" else dicom_labels(directory)
    report = SiloReport(directory=str(directory), kind=opts.kind)
    jobs: list[tuple[Path, SiloOptions]] = []
    rels: list[str] = []
    for path in files:
        rel = path.relative_to(directory).as_posix()
        if path.suffix.lower() == ".csv" and path.parent == directory:
            continue
        if opts.kind == "fundus":
            index.see(path.stem)
            if path.suffix.lower() not in EXTENSIONS:
                report.skip(rel, f"not a JPEG/PNG/TIFF image ({path.suffix or 'no extension'})")
                continue
            label = index.by_key.get(path.stem)
            if label is not None and label not in GRADES:
                report.skip(rel, f"label {label!r} in {index.source} is not a DR grade 0-4")
                continue
        elif index.key_kind == "path":
            index.see(rel)
        jobs.append((path, opts))
        rels.append(rel)
    images: list[np.ndarray] = []
    labels: list[str | None] = []
    keys: list[str] = []
    outcomes = _decode_all(jobs, default_workers() if workers is None else workers)
    for done, ((path, _), rel, outcome) in enumerate(
        zip(jobs, rels, outcomes, strict=True), start=1
    ):
        if progress:
            progress(done, len(jobs))
        if isinstance(outcome, str):
            report.skip(rel, outcome)
            continue
        label = _label(index, opts, rel, path, outcome)
        if opts.kind == "fundus" and index.source and label is None:
            report.warnings.append(f"{rel} has no row in {index.source}")
        report.files_read += 1
        report.sizes[outcome.size] += len(outcome.images)
        if outcome.modality is not None:
            report.modalities[outcome.modality] += len(outcome.images)
        if outcome.sop_class is not None:
            report.sop_classes[outcome.sop_class] += len(outcome.images)
        images.extend(outcome.images)
        labels.extend([label] * len(outcome.images))
        keys.extend([path.stem if opts.kind == "fundus" else rel] * len(outcome.images))
    report.skipped.sort()
    unknown = index.unknown_keys()
    if unknown:
        shown = ", ".join(unknown[:5]) + (" …" if len(unknown) > 5 else "")
        report.warnings.append(
            f"{index.source} names {len(unknown)} files not in the silo: {shown}"
        )
    report.images = len(images)
    report.labels.update("(none)" if lb is None else lb for lb in labels)
    report.warnings.extend(content_warnings(report, opts.image_size))
    size = opts.image_size
    stacked = (
        np.stack(images) if images else np.zeros((0, opts.channels, size, size), dtype=np.uint8)
    )
    return SiloData(stacked, labels, report, keys)


def _label(index: LabelIndex, opts: SiloOptions, rel: str, path: Path, out: Decoded) -> str | None:
    if opts.kind == "fundus":
        return index.lookup(path.stem)
    if index.source:
        return index.lookup(rel if index.key_kind == "path" else out.sop_instance_uid)
    return out.tag_label


def _fingerprint(directory: Path, files: list[Path], opts: SiloOptions) -> tuple[str, str]:
    """(prefix, key): prefix names this silo+options, key also its contents."""
    prefix = hashlib.sha256(f"{directory.resolve()}\0{opts.digest()}".encode()).hexdigest()[:16]
    h = hashlib.sha256(prefix.encode())
    for path in files:
        st = path.stat()
        h.update(
            f"{path.relative_to(directory).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode()
        )
    return prefix, h.hexdigest()[:16]


def load_silo(
    directory: Path,
    opts: SiloOptions,
    *,
    cache_dir: Path | None = None,
    progress: Progress | None = None,
    workers: int | None = None,
) -> SiloData:
    """Read a silo, through the cache when ``cache_dir`` is given."""
    directory = Path(directory)
    files = list_files(directory)
    if cache_dir is None:
        return read_silo(directory, opts, files, progress, workers)
    prefix, key = _fingerprint(directory, files, opts)
    npy = Path(cache_dir) / f"silo-{prefix}-{key}.npy"
    meta = npy.with_suffix(".json")
    if npy.exists() and meta.exists():
        try:
            doc = json.loads(meta.read_text())
            images = np.load(npy, mmap_mode="r")
            if images.shape[0] == len(doc["labels"]) == len(doc["keys"]):
                report = SiloReport.from_dict(doc["report"])
                report.cached = True
                return SiloData(images, doc["labels"], report, doc["keys"])
        except (OSError, ValueError, KeyError):
            pass  # a damaged cache is rebuilt, never trusted
    data = read_silo(directory, opts, files, progress, workers)
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(data.images))
    write_atomic(npy, buf.getvalue(), mode=0o600)
    write_text_atomic(
        meta,
        json.dumps({"labels": data.labels, "keys": data.keys, "report": data.report.to_dict()}),
        mode=0o600,
    )
    for stale in Path(cache_dir).glob(f"silo-{prefix}-*"):
        if stale.stem != npy.stem:
            stale.unlink(missing_ok=True)
    return data
