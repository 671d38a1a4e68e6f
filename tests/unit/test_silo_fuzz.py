"""Mutated DICOM and JPEG inputs: the decoders raise nothing but `SkipFile`."""

from __future__ import annotations

import io

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from fedgan.silo.dicom import decode_dicom_file
from fedgan.silo.fundus import decode_fundus_file
from fedgan.silo.options import SiloOptions
from fedgan.silo.report import SkipFile
from fedgan.silo.synth import synth_dicom

OPTS = SiloOptions(kind="dicom", image_size=16, channels=1)
FUZZ = settings(
    max_examples=1000,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def _dicom_seed() -> bytes:
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        synth_dicom(Path(tmp), 1, seed=0, size=16)
        return next(Path(tmp).rglob("*.dcm")).read_bytes()


def _jpeg_seed() -> bytes:
    rng = np.random.default_rng(0)
    out = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(out, "JPEG")
    return out.getvalue()


DICOM, JPEG = _dicom_seed(), _jpeg_seed()


def mutations(seed: bytes):
    edits = st.lists(
        st.tuples(st.integers(0, len(seed) - 1), st.integers(0, 255)), min_size=1, max_size=12
    )
    return st.tuples(edits, st.integers(1, len(seed)), st.booleans())


def _apply(seed: bytes, mutation) -> bytes:
    edits, cut, truncate = mutation
    data = bytearray(seed)
    for pos, value in edits:
        data[pos] = value
    return bytes(data[:cut] if truncate else data)


@FUZZ
@given(mutations(DICOM))
def test_mutated_dicom_raises_only_skipfile(tmp_path_factory, mutation):
    path = tmp_path_factory.getbasetemp() / "fuzz.dcm"
    path.write_bytes(_apply(DICOM, mutation))
    try:
        result = decode_dicom_file(path, OPTS)
    except SkipFile:
        return
    assert all(f.dtype == np.uint8 and f.ndim == 2 for f in result.frames)


@FUZZ
@given(mutations(JPEG))
def test_mutated_jpeg_raises_only_skipfile(tmp_path_factory, mutation):
    path = tmp_path_factory.getbasetemp() / "fuzz.jpg"
    path.write_bytes(_apply(JPEG, mutation))
    try:
        out = decode_fundus_file(path, 16, contrast=True)
    except SkipFile:
        return
    assert out.shape == (16, 16, 3)
