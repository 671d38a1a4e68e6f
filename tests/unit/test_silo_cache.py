"""The preprocessing cache: reused when fresh, rebuilt when stale, and the
silo itself never written."""

from __future__ import annotations

import hashlib
import os

import numpy as np

from fedgan.silo.loader import load_silo
from fedgan.silo.options import SiloOptions
from fedgan.silo.synth import synth_silo

OPTS = SiloOptions(kind="fundus", image_size=16, channels=3)


def _snapshot(directory):
    return {
        p.relative_to(directory).as_posix(): (
            p.stat().st_mtime_ns,
            hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir",
        )
        for p in sorted([directory, *directory.rglob("*")])
    }


def test_cache_is_reused_and_memory_mapped(tmp_path):
    silo = synth_silo(tmp_path / "silo", "fundus", 6, seed=1, size=32)
    cache = tmp_path / "work" / "cache"
    first = load_silo(silo, OPTS, cache_dir=cache)
    second = load_silo(silo, OPTS, cache_dir=cache)
    assert not first.report.cached and second.report.cached
    assert isinstance(second.images, np.memmap)
    np.testing.assert_array_equal(first.images, second.images)
    assert first.labels == second.labels
    assert len(list(cache.glob("*.npy"))) == 1


def test_changed_file_or_options_rebuild_and_stale_entries_go(tmp_path):
    silo = synth_silo(tmp_path / "silo", "fundus", 4, seed=1, size=32)
    cache = tmp_path / "cache"
    load_silo(silo, OPTS, cache_dir=cache)
    victim = next(silo.glob("*.jpg"))
    st = victim.stat()
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    rebuilt = load_silo(silo, OPTS, cache_dir=cache)
    assert not rebuilt.report.cached
    assert len(list(cache.glob("*.npy"))) == 1  # the stale one was removed
    other = SiloOptions(kind="fundus", image_size=16, channels=3, fundus_contrast=True)
    assert not load_silo(silo, other, cache_dir=cache).report.cached
    assert load_silo(silo, other, cache_dir=cache).report.cached


def test_damaged_cache_is_rebuilt_not_trusted(tmp_path):
    silo = synth_silo(tmp_path / "silo", "fundus", 3, seed=1, size=32)
    cache = tmp_path / "cache"
    good = load_silo(silo, OPTS, cache_dir=cache)
    next(cache.glob("*.npy")).write_bytes(b"garbage")
    again = load_silo(silo, OPTS, cache_dir=cache)
    assert not again.report.cached
    np.testing.assert_array_equal(good.images, again.images)


def test_silo_is_never_written(tmp_path):
    silo = synth_silo(tmp_path / "silo", "dicom", 4, seed=1, size=32)
    before = _snapshot(silo)
    opts = SiloOptions(kind="dicom", image_size=16, channels=1)
    load_silo(silo, opts, cache_dir=tmp_path / "cache")
    load_silo(silo, opts, cache_dir=tmp_path / "cache")
    assert _snapshot(silo) == before


def test_parallel_decoding_gives_the_sequential_result(tmp_path, monkeypatch):
    from fedgan.silo import loader

    silo = synth_silo(tmp_path / "silo", "dicom", 8, seed=3, size=32)
    (silo / "junk.bin").write_bytes(b"not dicom")
    opts = SiloOptions(kind="dicom", image_size=16, channels=1)
    monkeypatch.setattr(loader, "PARALLEL_MIN_FILES", 4)
    seen = []
    parallel = loader.read_silo(silo, opts, workers=2, progress=lambda d, t: seen.append((d, t)))
    sequential = loader.read_silo(silo, opts, workers=1)
    np.testing.assert_array_equal(parallel.images, sequential.images)
    assert parallel.labels == sequential.labels
    assert parallel.report.to_dict() == sequential.report.to_dict()
    assert parallel.report.skipped == [("junk.bin", "not a DICOM file")]
    assert seen[-1] == (9, 9)
