"""Images per second through the silo loader: cold (decode + LUTs + resize,
cache written), cached (memory-mapped), and bare `pydicom.dcmread(...).pixel_array`
for reference. Each figure is the best of 3 passes. Prints figures; never part
of the tests.

    .venv/bin/python bench/silo_throughput.py [--n 1000] [--size 512] [--image-size 64]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pydicom

from fedgan.silo.loader import list_files, load_silo
from fedgan.silo.options import SiloOptions
from fedgan.silo.synth import synth_dicom


def best(run: Callable[[], object], repeat: int = 3) -> float:
    """Best of ``repeat``: the pass least disturbed by other work."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def rate(n: int, seconds: float) -> str:
    return f"{n / seconds:8.1f} img/s ({seconds:6.2f} s)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--size", type=int, default=512, help="DICOM rows/columns")
    parser.add_argument("--image-size", type=int, default=64, help="training image size")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="fedgan-bench-"))
    try:
        silo = work / "silo"
        start = time.perf_counter()
        synth_dicom(silo, args.n, seed=0, size=args.size)
        took = time.perf_counter() - start
        print(f"wrote    {args.n} synthetic {args.size}x{args.size} DICOMs in {took:.1f} s")
        files = [p for p in list_files(silo) if p.suffix == ".dcm"]
        opts = SiloOptions(kind="dicom", image_size=args.image_size, channels=1)

        def bare() -> None:
            for path in files:
                pydicom.dcmread(path).pixel_array  # noqa: B018

        caches = (work / f"cache-{i}" for i in range(1000))
        bare_s = best(bare)
        cold_s = best(lambda: load_silo(silo, opts, cache_dir=next(caches)))
        warm = work / "cache-warm"
        load_silo(silo, opts, cache_dir=warm)
        cached_s = best(lambda: load_silo(silo, opts, cache_dir=warm).as_float())
        check = load_silo(silo, opts, cache_dir=warm)
        assert check.report.cached and check.report.images == len(files)

        py = platform.python_version()
        print(f"machine  {platform.machine()}, {os.cpu_count()} cores, python {py}")
        print(f"files    {len(files)} x {args.size}x{args.size} uint16 -> {args.image_size}px")
        print(f"bare pydicom dcmread+pixel_array  {rate(len(files), bare_s)}")
        ratio = cold_s / bare_s
        print(f"loader cold (decode, LUT, resize) {rate(len(files), cold_s)} {ratio:.2f}x bare")
        print(
            f"loader cached (mmap, to float)    {rate(len(files), cached_s)} "
            f"{cold_s / cached_s:.0f}x faster than cold"
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
