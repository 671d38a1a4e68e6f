"""Synthetic silos for demos, rehearsals and tests.

They are not meant to fool a clinician; they are meant to exercise the real
readers (valid JPEGs with a labels CSV in the APTOS layout; valid DICOM with
rescale, window and pixel spacing) and to give a GAN visible structure to learn
(a disc with an optic nerve head, vessels and grade-dependent lesions; a chest
with lungs, mediastinum and ribs).
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from fedgan.atomic import write_atomic, write_text_atomic

GRADE_WEIGHTS = np.array([0.45, 0.15, 0.2, 0.1, 0.1])


@dataclass(frozen=True)
class FundusCamera:
    """How one camera and one population look: the field of view, the colour
    profile, the sharpness and the mix of DR grades."""

    radius: tuple[float, float]  # of the field of view, as a fraction of the side
    base_rgb: tuple[tuple[float, float], ...]  # uniform range per channel
    blur: float  # Gaussian blur radius per 256 px
    quality: int  # JPEG quality
    grades: tuple[float, ...]


PROFILES = {
    # The sites' silos.
    "site": FundusCamera(
        (0.42, 0.47), ((150, 200), (60, 95), (20, 45)), 1.0, 92, tuple(GRADE_WEIGHTS)
    ),
    # A stand-in for a public collection: another camera (a wider field cut
    # at the top and bottom, a yellower, brighter colour profile, softer
    # optics, stronger compression) and a screening population (mostly
    # healthy). Its distribution differs from the sites' on purpose, as a real
    # public set's would; it is a stand-in and is named so wherever it appears.
    "public": FundusCamera(
        (0.5, 0.54), ((195, 235), (105, 140), (35, 65)), 2.0, 80, (0.7, 0.12, 0.1, 0.05, 0.03)
    ),
}
STAND_IN_MARKER = "STAND-IN-PUBLIC-SET.txt"


def _fundus_image(
    rng: np.random.Generator, grade: int, size: int, camera: FundusCamera = PROFILES["site"]
) -> Image.Image:
    img = Image.new("RGB", (size, size), (0, 0, 0))
    draw = ImageDraw.Draw(img)
    cx, cy = size / 2 + rng.normal(0, size * 0.01), size / 2 + rng.normal(0, size * 0.01)
    radius = size * rng.uniform(*camera.radius)
    base = np.array([rng.uniform(*span) for span in camera.base_rgb])
    # Radial shading: brighter centre, darker rim, as in a real fundus photograph.
    for step in range(24, 0, -1):
        r = radius * step / 24
        shade = base * (0.55 + 0.45 * (1 - step / 24) ** 0.5)
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=tuple(int(v) for v in shade))
    side = 1 if rng.random() < 0.5 else -1
    ox, oy = cx + side * radius * 0.38, cy + rng.normal(0, radius * 0.04)
    od = radius * rng.uniform(0.12, 0.16)
    # Vessels: arcs leaving the optic disc above and below.
    for k in range(6):
        angle = (k / 6) * 2 * math.pi + rng.normal(0, 0.2)
        points = [(ox, oy)]
        x, y, heading = ox, oy, angle
        for _ in range(12):
            heading += rng.normal(0, 0.18)
            x += math.cos(heading) * radius * 0.09
            y += math.sin(heading) * radius * 0.09
            if (x - cx) ** 2 + (y - cy) ** 2 > (radius * 0.97) ** 2:
                break
            points.append((x, y))
        width = max(1, int(size / 90 * (2 if k % 2 == 0 else 1)))
        draw.line(points, fill=(int(base[0] * 0.55), 15, 10), width=width)
    draw.ellipse([ox - od, oy - od, ox + od, oy + od], fill=(245, 215, 130))
    # Lesions grow with the diabetic-retinopathy grade: microaneurysms and
    # haemorrhages (dark red), hard exudates (yellow).
    for _ in range(int(grade * rng.integers(3, 7))):
        a, d = rng.uniform(0, 2 * math.pi), radius * math.sqrt(rng.uniform(0.02, 0.8))
        x, y = cx + d * math.cos(a), cy + d * math.sin(a)
        s = max(1.0, size / 128 * rng.uniform(1.0, 2.5 + grade))
        draw.ellipse([x - s, y - s, x + s, y + s], fill=(110, 10, 10))
    for _ in range(int(max(0, grade - 1) * rng.integers(2, 6))):
        a, d = rng.uniform(0, 2 * math.pi), radius * math.sqrt(rng.uniform(0.02, 0.6))
        x, y = cx + d * math.cos(a), cy + d * math.sin(a)
        s = max(1.0, size / 128 * rng.uniform(1.0, 3.0))
        draw.ellipse([x - s, y - s, x + s, y + s], fill=(235, 220, 90))
    if radius > size / 2:  # a wide field is cut by the sensor at the top and bottom
        cut = int(size * 0.04)
        draw.rectangle([0, 0, size, cut], fill=(0, 0, 0))
        draw.rectangle([0, size - cut, size, size], fill=(0, 0, 0))
    return img.filter(ImageFilter.GaussianBlur(radius=camera.blur * size / 256))


def synth_fundus(
    directory: Path, n: int, *, seed: int = 0, size: int = 128, profile: str = "site"
) -> Path:
    """Write ``n`` fundus JPEGs, ``labels.csv`` (``id_code,diagnosis``) and
    ``attributes.csv`` (``id_code,age,sex``); with ``profile="public"``, a
    stand-in public set (another camera and grade mix) marked as such."""
    if profile not in PROFILES:
        raise ValueError(f"unknown fundus profile {profile!r}; use {' or '.join(PROFILES)}")
    camera = PROFILES[profile]
    directory = Path(directory)
    rng = np.random.default_rng(seed)
    rows = []
    prefix = "synth" if profile == "site" else "standin"
    for i in range(n):
        grade = int(rng.choice(5, p=np.array(camera.grades)))
        image_id = f"{prefix}{seed:04d}_{i:05d}"
        out = io.BytesIO()
        _fundus_image(rng, grade, size, camera).save(out, format="JPEG", quality=camera.quality)
        write_atomic(directory / f"{image_id}.jpg", out.getvalue())
        rows.append((image_id, grade))
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["id_code", "diagnosis"])
    writer.writerows(rows)
    write_text_atomic(directory / "labels.csv", text.getvalue())
    _write_attributes(directory, "id_code", [r[0] for r in rows], seed)
    if profile == "public":
        write_text_atomic(
            directory / STAND_IN_MARKER,
            "A stand-in for a public fundus collection, drawn by `fedgan silo synth "
            "--profile public`:\nanother camera, colour profile and grade mix than the sites' "
            "synthetic silos. Not real data.\n",
        )
    return directory


def _write_attributes(directory: Path, key: str, keys: list[str], seed: int) -> None:
    """``attributes.csv`` with a synthetic age and sex per image, for
    tabular conditioning (``attributes = "age=0:100,sex=F|M"``)."""
    rng = np.random.default_rng([seed, 7])  # apart from the images' stream
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow([key, "age", "sex"])
    for k in keys:
        writer.writerow([k, int(rng.integers(18, 91)), "F" if rng.random() < 0.5 else "M"])
    write_text_atomic(directory / "attributes.csv", text.getvalue())


def _chest_pixels(rng: np.random.Generator, size: int, abnormal: bool) -> np.ndarray:
    """Hounsfield-like values: air -1000, soft tissue ~40, bone ~700."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    body = ((xx - 0.5) / 0.46) ** 2 + ((yy - 0.55) / 0.5) ** 2 < 1
    hu = np.full((size, size), -1000.0, dtype=np.float32)
    hu[body] = 40.0
    for side in (-1, 1):
        lx = 0.5 + side * rng.uniform(0.17, 0.21)
        lung = ((xx - lx) / rng.uniform(0.13, 0.16)) ** 2 + (
            (yy - 0.5) / rng.uniform(0.3, 0.34)
        ) ** 2
        hu[lung < 1] = -850.0 + rng.normal(0, 20)
    for k in range(7):
        y0 = 0.25 + k * 0.075
        for side in (-1, 1):
            rib = np.abs((yy - y0 - 0.12 * ((xx - 0.5) * side) ** 2 * 4) * size) < max(
                1.0, size / 90
            )
            rib &= np.abs(xx - 0.5) > 0.06
            rib &= np.abs(xx - 0.5) < 0.4
            hu[rib & body] = 250.0
    spine = (np.abs(xx - 0.5) < 0.035) & body
    hu[spine] = 900.0
    if abnormal:
        side = 1 if rng.random() < 0.5 else -1
        nx, ny = 0.5 + side * rng.uniform(0.14, 0.24), rng.uniform(0.35, 0.65)
        r = rng.uniform(0.03, 0.07)
        hu[((xx - nx) ** 2 + (yy - ny) ** 2) < r**2] = 60.0
    hu += rng.normal(0, 12, size=hu.shape).astype(np.float32)
    return hu


def synth_dicom(directory: Path, n: int, *, seed: int = 0, size: int = 128) -> Path:
    """Write ``n`` valid chest DICOM files (MONOCHROME2, 16-bit, rescale
    slope/intercept, window, pixel spacing) in nested series folders, and
    ``labels.csv`` (``path,label``: normal or abnormal)."""
    import pydicom
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    directory = Path(directory)
    rng = np.random.default_rng(seed)
    slope, intercept = 1.0, -1024.0
    rows = []
    study = generate_uid()
    for i in range(n):
        abnormal = bool(rng.random() < 0.4)
        hu = _chest_pixels(rng, size, abnormal)
        stored = np.clip((hu - intercept) / slope, 0, 4095).astype(np.uint16)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = pydicom.uid.CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset("", {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID = meta.MediaStorageSOPClassUID
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID = study
        ds.SeriesInstanceUID = generate_uid()
        ds.PatientName = f"SYNTH^{seed:04d}{i:05d}"
        ds.PatientID = f"SYN{seed:04d}{i:05d}"
        ds.StudyDate = dt.date(2026, 1, 1).strftime("%Y%m%d")
        ds.Modality = "CT"
        ds.BodyPartExamined = "CHEST"
        ds.Rows = ds.Columns = size
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = 16
        ds.BitsStored = 12
        ds.HighBit = 11
        ds.PixelRepresentation = 0
        ds.RescaleSlope = slope
        ds.RescaleIntercept = intercept
        ds.WindowCenter = -600
        ds.WindowWidth = 1500
        ds.PixelSpacing = [round(350 / size, 4)] * 2
        ds.PixelData = stored.tobytes()
        rel = Path(f"series{i % 3:02d}") / f"IMG{i:05d}.dcm"
        out = io.BytesIO()
        ds.save_as(out, enforce_file_format=True)
        write_atomic(directory / rel, out.getvalue())
        rows.append((rel.as_posix(), "abnormal" if abnormal else "normal"))
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["path", "label"])
    writer.writerows(rows)
    write_text_atomic(directory / "labels.csv", text.getvalue())
    _write_attributes(directory, "path", [r[0] for r in rows], seed)
    return directory


def synth_silo(
    directory: Path, kind: str, n: int, *, seed: int = 0, size: int = 128, profile: str = "site"
) -> Path:
    if n < 1:
        raise ValueError("--n must be at least 1")
    if kind == "fundus":
        return synth_fundus(directory, n, seed=seed, size=size, profile=profile)
    if profile != "site":
        raise ValueError("--profile public is drawn for fundus silos only; use --kind fundus")
    if kind == "dicom":
        return synth_dicom(directory, n, seed=seed, size=size)
    raise ValueError(f"unknown silo kind {kind!r}; use fundus or dicom")
