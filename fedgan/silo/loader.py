"""The one entry point that turns a silo directory into training images:
walk the tree, decode each file (`dicom`, `fundus`), attach labels, report
what was skipped, and cache the result in the site's work volume.

The silo itself is only ever opened for reading. The cache is a memory-mapped
``.npy`` of uint8 images keyed by the silo's path, every file's size and
mtime, and the options' digest: change a file or an option and it is rebuilt.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from fedgan.atomic import write_atomic, write_text_atomic
from fedgan.silo.dicom import decode_dicom_file
from fedgan.silo.fundus import EXTENSIONS, decode_fundus_file
from fedgan.silo.labels import GRADES, LabelIndex, dicom_labels, fundus_labels
from fedgan.silo.options import SiloError, SiloOptions
from fedgan.silo.report import SiloReport, SkipFile
from fedgan.silo.resize import fit_square

Progress = Callable[[int, int], None]


@dataclass
class SiloData:
    images: np.ndarray  # uint8 N×C×H×W, possibly memory-mapped
    labels: list[str | None]
    report: SiloReport

    def as_float(self) -> np.ndarray:
        """float32 in [-1, 1], the range the GAN trains in."""
        return np.asarray(self.images, dtype=np.float32) / 127.5 - 1.0


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


def _resize_unit(frame: np.ndarray, size: int) -> np.ndarray:
    img = Image.fromarray(np.rint(frame * 255.0).astype(np.uint8))
    return np.asarray(fit_square(img, size))


def read_silo(
    directory: Path,
    opts: SiloOptions,
    files: list[Path] | None = None,
    progress: Progress | None = None,
) -> SiloData:
    """Decode every usable image; uncached. See `load_silo`."""
    directory = Path(directory)
    files = list_files(directory) if files is None else files
    index = fundus_labels(directory) if opts.kind == "fundus" else dicom_labels(directory)
    report = SiloReport(directory=str(directory), kind=opts.kind)
    images: list[np.ndarray] = []
    labels: list[str | None] = []
    for i, path in enumerate(files):
        rel = path.relative_to(directory).as_posix()
        if progress:
            progress(i + 1, len(files))
        if path.suffix.lower() == ".csv" and path.parent == directory:
            continue
        if index.key_kind != "uid":
            index.see(path.stem if opts.kind == "fundus" else rel)
        report.files_read += 1
        try:
            if opts.kind == "fundus":
                new, new_labels = _fundus(path, rel, opts, index, report)
            else:
                new, new_labels = _dicom(path, rel, opts, index, report)
        except SkipFile as skip:
            report.files_read -= 1
            report.skip(rel, str(skip))
            continue
        images.extend(new)
        labels.extend(new_labels)
    unknown = index.unknown_keys()
    if unknown:
        shown = ", ".join(unknown[:5]) + (" …" if len(unknown) > 5 else "")
        report.warnings.append(
            f"{index.source} names {len(unknown)} files not in the silo: {shown}"
        )
    report.images = len(images)
    report.labels.update("(none)" if lb is None else lb for lb in labels)
    size = opts.image_size
    stacked = (
        np.stack(images) if images else np.zeros((0, opts.channels, size, size), dtype=np.uint8)
    )
    return SiloData(stacked, labels, report)


def _fundus(
    path: Path, rel: str, opts: SiloOptions, index: LabelIndex, report: SiloReport
) -> tuple[list[np.ndarray], list[str | None]]:
    if path.suffix.lower() not in EXTENSIONS:
        raise SkipFile(f"not a JPEG/PNG/TIFF image ({path.suffix or 'no extension'})")
    label = index.lookup(path.stem)
    if label is not None and label not in GRADES:
        raise SkipFile(f"label {label!r} in {index.source} is not a DR grade 0-4")
    if index.source and label is None:
        report.warnings.append(f"{rel} has no row in {index.source}")
    with Image.open(path) as img:
        report.sizes[f"{img.width}x{img.height}"] += 1
    rgb = decode_fundus_file(path, opts.image_size, opts.fundus_contrast)
    return [_rgb_to_channels(rgb, opts.channels)], [label]


def _dicom(
    path: Path, rel: str, opts: SiloOptions, index: LabelIndex, report: SiloReport
) -> tuple[list[np.ndarray], list[str | None]]:
    decoded = decode_dicom_file(path, opts)
    if index.source:
        key = rel if index.key_kind == "path" else decoded.sop_instance_uid
        label = index.lookup(key)
    else:
        label = decoded.tag_label
    report.modalities[decoded.modality] += len(decoded.frames)
    report.sizes[f"{decoded.columns}x{decoded.rows}"] += len(decoded.frames)
    out = [
        _gray_to_channels(_resize_unit(frame, opts.image_size), opts.channels)
        for frame in decoded.frames
    ]
    return out, [label] * len(out)


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
) -> SiloData:
    """Read a silo, through the cache when ``cache_dir`` is given."""
    directory = Path(directory)
    files = list_files(directory)
    if cache_dir is None:
        return read_silo(directory, opts, files, progress)
    prefix, key = _fingerprint(directory, files, opts)
    npy = Path(cache_dir) / f"silo-{prefix}-{key}.npy"
    meta = npy.with_suffix(".json")
    if npy.exists() and meta.exists():
        try:
            doc = json.loads(meta.read_text())
            images = np.load(npy, mmap_mode="r")
            if images.shape[0] == len(doc["labels"]):
                report = SiloReport.from_dict(doc["report"])
                report.cached = True
                return SiloData(images, doc["labels"], report)
        except (OSError, ValueError, KeyError):
            pass  # a damaged cache is rebuilt, never trusted
    data = read_silo(directory, opts, files, progress)
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(data.images))
    write_atomic(npy, buf.getvalue(), mode=0o600)
    write_text_atomic(
        meta, json.dumps({"labels": data.labels, "report": data.report.to_dict()}), mode=0o600
    )
    for stale in Path(cache_dir).glob(f"silo-{prefix}-*"):
        if stale.stem != npy.stem:
            stale.unlink(missing_ok=True)
    return data
