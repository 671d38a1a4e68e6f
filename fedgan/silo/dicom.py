"""DICOM decoding: what PACS exports, turned into grayscale frames in [0, 1].

Per file: read with pydicom; refuse directory indexes and objects without
pixels (SR, RTSTRUCT, …); apply the site's filters (Modality,
BodyPartExamined, ViewPosition); decode (compressed transfer syntaxes through
pylibjpeg's plugins); split multi-frame objects; apply the Modality LUT
(rescale slope/intercept) and the VOI transform (the site's window, else the
file's VOI LUT, else its window center/width as PS3.3 C.11.2.1.2 defines it,
else the frame's own range), for enhanced objects from each frame's functional
groups; invert MONOCHROME1; convert colour to luminance or refuse it.

Everything that goes wrong in one file becomes a `SkipFile` with a reason
built from our own words and the file's structure, never from tag values, so
no patient data reaches a log.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut, get_decoder
from pydicom.uid import UID

from fedgan.silo.options import SiloOptions
from fedgan.silo.report import SkipFile


def _silence_pydicom() -> None:
    """pydicom reports an invalid element value by quoting it, through
    `warnings` and through its own logger: a patient tag or a real file's
    SOPInstanceUID would reach the site's log. A site never needs pydicom
    to validate what it reads (it decides what to keep itself, with reasons
    that name no value), so reading validation is off and pydicom's log
    records go nowhere, in every process that reads a silo."""
    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    logger = logging.getLogger("pydicom")
    logger.propagate = False
    if not any(isinstance(h, logging.NullHandler) for h in logger.handlers):
        logger.addHandler(logging.NullHandler())


_silence_pydicom()

DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"
LUMA = np.array([0.299, 0.587, 0.114])


# Integer frames go through a lookup table over their value range (one gather
# per pixel instead of a float pipeline); wider ranges are computed directly.
MAX_LUT_ENTRIES = 1 << 20


@dataclass(frozen=True)
class DecodedDicom:
    frames: list[np.ndarray]  # uint8 H×W display values
    modality: str
    sop_instance_uid: str
    tag_label: str | None
    rows: int
    columns: int
    sop_class: str = "unknown SOP class"  # its name, e.g. "RT Dose Storage"


def _sop_name(ds: pydicom.Dataset) -> str:
    uid = ds.get("SOPClassUID") or getattr(ds.get("file_meta"), "MediaStorageSOPClassUID", None)
    if not uid:
        return "unknown SOP class"
    name = UID(str(uid)).name
    return name if name and name != str(uid) else "unknown SOP class"


def _first(value: object) -> float:
    if isinstance(value, pydicom.multival.MultiValue | list | tuple):
        return float(value[0])
    return float(value)  # type: ignore[arg-type]


def window_unit(values: np.ndarray, center: float, width: float, function: str) -> np.ndarray:
    """PS3.3 C.11.2.1.2/C.11.2.1.3 windowing with the output range [0, 1]."""
    function = function.upper()
    if function == "SIGMOID":
        return 1.0 / (1.0 + np.exp(-4.0 * (values - center) / width))
    if function == "LINEAR":
        center, width = center - 0.5, width - 1.0
        if width <= 0:  # a width of 1 is a hard threshold at the center
            return (values > center).astype(np.float64)
    out = (values - center) / width + 0.5
    return np.clip(out, 0.0, 1.0)


def _min_max(values: np.ndarray, extremes: np.ndarray) -> np.ndarray:
    low, high = float(extremes.min()), float(extremes.max())
    if high <= low:
        return np.zeros_like(values, dtype=np.float64)
    return np.clip((values - low) / (high - low), 0.0, 1.0)


def gray_unit(
    stored: np.ndarray,
    ds: pydicom.Dataset,
    window: tuple[float, float] | None,
    frame_range: tuple[int, int] | None = None,
) -> np.ndarray:
    """Stored grayscale values to display values in [0, 1] (elementwise, so it
    can run on a frame or on the domain of a lookup table; then
    ``frame_range``, the frame's stored min and max, anchors the no-window
    fallback to the frame's own extremes)."""
    values = np.asarray(apply_modality_lut(stored, ds), dtype=np.float64)
    extremes = values
    if frame_range is not None:
        ends = np.asarray(frame_range, dtype=stored.dtype)
        extremes = np.asarray(apply_modality_lut(ends, ds), dtype=np.float64)
    if window is not None:
        out = window_unit(values, window[0], window[1], "LINEAR")
    elif "VOILUTSequence" in ds and len(ds.VOILUTSequence) > 0:
        bits = int(ds.VOILUTSequence[0].LUTDescriptor[2])
        out = np.asarray(apply_voi_lut(values, ds, prefer_lut=True), dtype=np.float64)
        out = out / float(2**bits - 1)
    elif "WindowCenter" in ds and "WindowWidth" in ds:
        center, width = _first(ds.WindowCenter), _first(ds.WindowWidth)
        function = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR")
        if width <= 0 or function.upper() not in ("LINEAR", "LINEAR_EXACT", "SIGMOID"):
            out = _min_max(values, extremes)
        else:
            out = window_unit(values, center, width, function)
    else:
        out = _min_max(values, extremes)
    if ds.PhotometricInterpretation == "MONOCHROME1":
        out = 1.0 - out
    return np.clip(out, 0.0, 1.0)


# Enhanced (multi-frame) objects keep the rescale and the window in
# functional groups, per frame or shared by all (PS3.3 C.7.6.16), not at the
# top level where `apply_modality_lut` and the window code look for them.
_FRAME_GROUPS = (
    ("PixelValueTransformationSequence", ("RescaleIntercept", "RescaleSlope", "RescaleType")),
    ("FrameVOILUTSequence", ("WindowCenter", "WindowWidth", "VOILUTFunction", "VOILUTSequence")),
)


def has_functional_groups(ds: pydicom.Dataset) -> bool:
    return "SharedFunctionalGroupsSequence" in ds or "PerFrameFunctionalGroupsSequence" in ds


def frame_view(ds: pydicom.Dataset, index: int) -> pydicom.Dataset:
    """Frame ``index`` of an enhanced object as a classic dataset: the
    top-level attributes its display depends on, with the rescale and window
    of its per-frame functional group, else of the shared one."""
    view = pydicom.Dataset()
    meta = getattr(ds, "file_meta", None)
    if meta is not None:  # LUT data stored as OW is read by its transfer syntax
        view.file_meta = meta
    for keyword in (
        "PhotometricInterpretation",
        "PixelRepresentation",
        "BitsStored",
        "ModalityLUTSequence",
        "VOILUTSequence",
        "RescaleIntercept",
        "RescaleSlope",
        "WindowCenter",
        "WindowWidth",
        "VOILUTFunction",
    ):
        if keyword in ds:
            view[keyword] = ds[keyword]
    groups = (
        [ds.SharedFunctionalGroupsSequence[0]] if ds.get("SharedFunctionalGroupsSequence") else []
    )
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    if index < len(per_frame):
        groups.append(per_frame[index])  # last, so it overrides the shared group
    for group in groups:
        for sequence, keywords in _FRAME_GROUPS:
            items = group.get(sequence) or []
            for keyword in keywords:
                if items and keyword in items[0]:
                    view[keyword] = items[0][keyword]
    return view


def _to_u8(unit: np.ndarray) -> np.ndarray:
    return np.rint(unit * 255.0).astype(np.uint8)


def gray_u8(
    frame: np.ndarray, ds: pydicom.Dataset, window: tuple[float, float] | None
) -> np.ndarray:
    """One stored frame to uint8 display values. The frame's min and max are
    the ends of the table's domain, so the min/max fallback (no window) sees
    the same extremes as on the frame itself."""
    if np.issubdtype(frame.dtype, np.integer):
        low, high = int(frame.min()), int(frame.max())
        if high - low < MAX_LUT_ENTRIES:
            start = min(low, 0) if high < MAX_LUT_ENTRIES else low
            domain = np.arange(start, high + 1, dtype=frame.dtype)
            lut = _to_u8(gray_unit(domain, ds, window, frame_range=(low, high)))
            # Unsigned frames index the table directly (no index arithmetic).
            index = frame if start == 0 else frame.astype(np.int64) - start
            return np.take(lut, index)
    return _to_u8(gray_unit(frame, ds, window))


def _color_unit(frames: np.ndarray, ds: pydicom.Dataset) -> list[np.ndarray]:
    """RGB (pydicom already converts YBR_FULL/_422) or palette to luminance."""
    if ds.PhotometricInterpretation == "PALETTE COLOR":
        rgb = np.asarray(apply_color_lut(frames, ds), dtype=np.float64)
        scale = 65535.0 if rgb.max() > 255 else 255.0
    else:
        rgb = frames.astype(np.float64)
        scale = float(2 ** int(ds.BitsStored) - 1)
    luma = (rgb @ LUMA) / scale
    return [_to_u8(np.clip(f, 0.0, 1.0)) for f in luma]


def _decoder_available(ts: UID) -> bool:
    try:
        return bool(get_decoder(ts).is_available)
    except (NotImplementedError, ValueError):
        return False


def _require_layout(ds: pydicom.Dataset, meta: pydicom.Dataset | None) -> None:
    """Name what is missing for the pixel data to be laid out, before
    decoding fails on it with an error that names nothing."""
    if meta is None or "TransferSyntaxUID" not in meta:
        raise SkipFile(
            "no Transfer Syntax UID in the file meta (how the pixels are encoded is unknown); "
            "re-export the file from the PACS"
        )
    missing = [
        keyword
        for keyword in ("Rows", "Columns", "BitsAllocated", "PhotometricInterpretation")
        if ds.get(keyword) in (None, "")
    ]
    if missing:
        raise SkipFile(f"missing {', '.join(missing)}: the pixel data cannot be laid out")


def _passes(value: str, allowed: tuple[str, ...]) -> bool:
    return not allowed or value.upper() in allowed


def decode_dicom_file(path: Path, opts: SiloOptions) -> DecodedDicom:
    """Decode one file or raise `SkipFile` with the reason; never anything else."""
    try:
        return _decode(path, opts)
    except SkipFile:
        raise
    except MemoryError:
        raise SkipFile("pixel data too large for memory") from None
    except Exception as exc:  # one bad file never stops the silo
        raise SkipFile(f"unreadable DICOM ({type(exc).__name__})") from None


def _decode(path: Path, opts: SiloOptions) -> DecodedDicom:
    with warnings.catch_warnings():
        # pydicom's warnings can quote element values (patient tags).
        warnings.simplefilter("ignore")
        try:
            ds = pydicom.dcmread(path)
        except InvalidDicomError:
            # Some exporters omit the 128-byte preamble; accept such a file
            # only if it parses into something that names its SOP class.
            ds = pydicom.dcmread(path, force=True)
            if "SOPClassUID" not in ds:
                raise SkipFile("not a DICOM file") from None
        meta = ds.get("file_meta")
        if (
            getattr(meta, "MediaStorageSOPClassUID", None) == DICOMDIR_SOP_CLASS
            or "DirectoryRecordSequence" in ds
        ):
            raise SkipFile("DICOMDIR (a directory index, not an image)")
        if "PixelData" not in ds:
            raise SkipFile(f"no pixel data ({_sop_name(ds)})")
        modality = str(ds.get("Modality", "") or "")
        for keyword, allowed in (
            ("Modality", opts.modality),
            ("BodyPartExamined", opts.body_part),
            ("ViewPosition", opts.view_position),
        ):
            value = str(ds.get(keyword, "") or "")
            if not _passes(value, allowed):
                raise SkipFile(
                    f"filtered out: {keyword} {value or '(empty)'} not in {','.join(allowed)}"
                )
        _require_layout(ds, meta)
        photometric = str(ds.get("PhotometricInterpretation", ""))
        spp = int(ds.get("SamplesPerPixel", 1) or 1)
        is_color = spp == 3 or photometric == "PALETTE COLOR"
        if is_color and opts.color == "refuse":
            raise SkipFile(f"colour image ({photometric}); set color=convert to use its luminance")
        if not is_color and photometric not in ("MONOCHROME1", "MONOCHROME2"):
            raise SkipFile(f"photometric interpretation {photometric or '(none)'} not supported")
        try:
            pixels = ds.pixel_array
        except (NotImplementedError, RuntimeError):
            ts = getattr(meta, "TransferSyntaxUID", None)
            name = UID(str(ts)).name if ts else "unknown transfer syntax"
            if ts and not _decoder_available(UID(str(ts))):
                raise SkipFile(f"unsupported compression {name}: no decoder installed") from None
            raise SkipFile(f"compressed pixel data could not be decoded ({name})") from None
        frames_n = int(ds.get("NumberOfFrames", 1) or 1)
        if frames_n == 1:
            pixels = pixels[None]
        expected_ndim = 4 if spp == 3 else 3
        if pixels.ndim != expected_ndim or pixels.shape[1] < 2 or pixels.shape[2] < 2:
            raise SkipFile(f"unexpected pixel array shape {tuple(pixels.shape)}")
        if is_color:
            frames = _color_unit(pixels, ds)
        else:
            if not np.issubdtype(pixels.dtype, np.integer) and not np.isfinite(pixels).all():
                raise SkipFile("pixel values are not finite")
            views = (
                [frame_view(ds, i) for i in range(len(pixels))]
                if has_functional_groups(ds)
                else [ds] * len(pixels)
            )
            frames = [
                gray_u8(frame, view, opts.window) for frame, view in zip(pixels, views, strict=True)
            ]
        tag_label = None
        if opts.label_tag:
            value = ds.get(opts.label_tag)
            tag_label = str(value).strip() if value not in (None, "") else None
        return DecodedDicom(
            frames=frames,
            modality=modality or "(none)",
            sop_instance_uid=str(ds.get("SOPInstanceUID", "")),
            tag_label=tag_label,
            rows=int(pixels.shape[1]),
            columns=int(pixels.shape[2]),
            sop_class=_sop_name(ds),
        )
