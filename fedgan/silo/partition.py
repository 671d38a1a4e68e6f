"""Non-IID site silos for consortium rehearsals.

Label skew by Dirichlet(α) (Hsu et al. 2019): for each label, the share of its
images going to each site is drawn from Dir(α·1); small α gives each site a
few dominant labels, large α approaches an even split. Optional quantity skew
multiplies the shares by site sizes drawn from Dir(β·1). The same seed gives
the same split.
"""

from __future__ import annotations

import csv
import io
import shutil
from collections import defaultdict
from pathlib import Path

import numpy as np

from fedgan.atomic import write_text_atomic
from fedgan.attributes import KEY_COLUMNS, read_table
from fedgan.silo.labels import dicom_labels, fundus_labels
from fedgan.silo.loader import list_files
from fedgan.silo.options import SiloError

MAX_DRAWS = 100


def dirichlet_split(
    labels: list[str],
    sites: int,
    alpha: float,
    *,
    seed: int = 0,
    quantity_alpha: float | None = None,
) -> list[list[int]]:
    """Indices of ``labels`` for each site; every site gets at least one item
    when there are enough items (re-drawn up to MAX_DRAWS times)."""
    if sites < 1 or alpha <= 0 or (quantity_alpha is not None and quantity_alpha <= 0):
        raise SiloError("--sites must be >= 1 and --alpha/--quantity-alpha > 0")
    if len(labels) < sites:
        raise SiloError(f"{len(labels)} labelled images cannot fill {sites} sites")
    rng = np.random.default_rng(seed)
    by_label: dict[str, list[int]] = defaultdict(list)
    for i, label in enumerate(labels):
        by_label[label].append(i)
    for _ in range(MAX_DRAWS):
        size_weights = rng.dirichlet([quantity_alpha] * sites) if quantity_alpha else np.ones(sites)
        parts: list[list[int]] = [[] for _ in range(sites)]
        for label in sorted(by_label):
            idx = np.array(by_label[label])
            rng.shuffle(idx)
            shares = rng.dirichlet([alpha] * sites) * size_weights
            shares /= shares.sum()
            cuts = (np.cumsum(shares)[:-1] * len(idx)).round().astype(int)
            for site, chunk in enumerate(np.split(idx, cuts)):
                parts[site].extend(int(i) for i in chunk)
        if all(parts):
            return [sorted(p) for p in parts]
    raise SiloError(
        f"could not give all {sites} sites an image with alpha={alpha}; "
        "raise --alpha or lower --sites"
    )


def labelled_files(src: Path, kind: str) -> tuple[list[str], list[str]]:
    """(relative paths, labels) of the silo's labelled files, from its CSV."""
    index = fundus_labels(src) if kind == "fundus" else dicom_labels(src)
    if not index.source or index.key_kind == "uid":
        layout = "id_code,diagnosis" if kind == "fundus" else "path,label"
        raise SiloError(f"{src} needs a labels CSV keyed by file ({layout})")
    rels, labels = [], []
    for path in list_files(src):
        rel = path.relative_to(src).as_posix()
        key = path.stem if kind == "fundus" else rel
        if key in index.by_key and path.suffix.lower() != ".csv":
            rels.append(rel)
            labels.append(index.by_key[key])
    if not rels:
        raise SiloError(f"{src}: no file matches a row of {index.source}")
    return rels, labels


def write_split(
    src: Path,
    out: Path,
    kind: str,
    sites: int,
    alpha: float,
    *,
    seed: int = 0,
    quantity_alpha: float | None = None,
) -> list[Path]:
    """Copy the source's files into ``out/site-N`` silos, each with its own
    labels CSV in the source's layout and, when the source has an
    ``attributes.csv``, the rows of it for the site's own images (a rehearsal
    of an attribute-conditioned run needs them at every site). The source is
    only read."""
    src, out = Path(src), Path(out)
    rels, labels = labelled_files(src, kind)
    attributes = _attribute_rows(src, kind)
    parts = dirichlet_split(labels, sites, alpha, seed=seed, quantity_alpha=quantity_alpha)
    dirs = []
    for site, indices in enumerate(parts, start=1):
        site_dir = out / f"site-{site}"
        if site_dir.exists() and any(site_dir.iterdir()):
            raise SiloError(f"{site_dir} exists and is not empty; choose another --out")
        text = io.StringIO()
        writer = csv.writer(text, lineterminator="\n")
        writer.writerow(["id_code", "diagnosis"] if kind == "fundus" else ["path", "label"])
        for i in indices:
            target = site_dir / rels[i]
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src / rels[i], target)
            writer.writerow([_file_key(rels[i], kind), labels[i]])
        write_text_atomic(site_dir / "labels.csv", text.getvalue())
        if attributes is not None:
            header, by_key = attributes
            text = io.StringIO()
            writer = csv.writer(text, lineterminator="\n")
            writer.writerow(header)
            for i in indices:
                writer.writerows(by_key.get(_file_key(rels[i], kind), []))
            write_text_atomic(site_dir / "attributes.csv", text.getvalue())
        dirs.append(site_dir)
    return dirs


def _file_key(rel: str, kind: str) -> str:
    """How labels and attributes name a file: its stem (fundus) or its path."""
    return Path(rel).stem if kind == "fundus" else rel


def _attribute_rows(src: Path, kind: str) -> tuple[list[str], dict[str, list[list[str]]]] | None:
    """The source's ``attributes.csv`` as (header, key → its rows, unparsed),
    or None when it has none. Values are copied as written: whether they
    encode is the run's attributes declaration's business, checked at the
    site."""
    path = src / "attributes.csv"
    if not path.exists():
        return None
    header, rows, k = read_table(path, kind)
    if k is None:
        raise SiloError(
            f"{path}: header needs a key column ({' or '.join(KEY_COLUMNS[kind])});"
            " fix it or move the file out of the silo"
        )
    by_key: dict[str, list[list[str]]] = defaultdict(list)
    for row in rows:
        if len(row) > k and row[k].strip():
            by_key[_file_key(row[k].strip(), kind)].append(row)
    return header, by_key
