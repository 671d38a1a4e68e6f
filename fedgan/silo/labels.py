"""Labels CSVs in the layouts hospitals and public data sets use.

fundus: ``id_code,diagnosis`` (APTOS) or ``image,level`` (EyePACS), keyed by
file name without extension, grade 0-4.
dicom:  ``path,label`` (path relative to the silo) or ``sop_instance_uid,label``.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

from fedgan.silo.options import SiloError

FUNDUS_LAYOUTS = (("id_code", "diagnosis"), ("image", "level"))
DICOM_KEYS = {"path": "path", "sop_instance_uid": "uid", "sopinstanceuid": "uid"}
GRADES = {"0", "1", "2", "3", "4"}


@dataclass
class LabelIndex:
    source: str | None = None
    key_kind: str = "stem"  # stem | path | uid
    by_key: dict[str, str] = field(default_factory=dict)
    seen: set[str] = field(default_factory=set)

    def lookup(self, key: str) -> str | None:
        self.seen.add(key)
        return self.by_key.get(key)

    def see(self, key: str) -> None:
        """A file with this key exists, usable or not."""
        self.seen.add(key)

    def unknown_keys(self) -> list[str]:
        """Rows naming no file of the silo (for UID keys: no decoded file)."""
        return sorted(set(self.by_key) - self.seen)


def _read_rows(path: Path) -> tuple[list[str], list[list[str]]]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            rows = [r for r in csv.reader(fh) if any(c.strip() for c in r)]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise SiloError(f"{path} cannot be read as CSV ({type(exc).__name__})") from None
    if not rows:
        return [], []
    return [h.strip().lower() for h in rows[0]], rows[1:]


def fundus_labels(directory: Path) -> LabelIndex:
    """The first CSV at the silo's top level in a known layout (labels.csv first)."""
    candidates = sorted(directory.glob("*.csv"), key=lambda p: (p.name != "labels.csv", p.name))
    for path in candidates:
        header, rows = _read_rows(path)
        for key_col, label_col in FUNDUS_LAYOUTS:
            if key_col in header and label_col in header:
                k, v = header.index(key_col), header.index(label_col)
                index = LabelIndex(source=path.name, key_kind="stem")
                for row in rows:
                    if len(row) > max(k, v):
                        index.by_key[Path(row[k].strip()).stem] = row[v].strip()
                return index
    return LabelIndex()


def dicom_labels(directory: Path) -> LabelIndex:
    path = directory / "labels.csv"
    if not path.exists():
        return LabelIndex()
    header, rows = _read_rows(path)
    key_col = next((h for h in header if h in DICOM_KEYS), None)
    if key_col is None or "label" not in header:
        # Its first row is not echoed: without a header it is a data row,
        # and this message reaches the site's log and the aggregator.
        raise SiloError(
            f"{path.name} in the silo needs a header row 'path,label' or "
            f"'sop_instance_uid,label'; its first row ({len(header)} columns) names neither"
        )
    k, v = header.index(key_col), header.index("label")
    index = LabelIndex(source=path.name, key_kind=DICOM_KEYS[key_col])
    for row in rows:
        if len(row) > max(k, v):
            key = row[k].strip()
            index.by_key[Path(key).as_posix() if index.key_kind == "path" else key] = row[v].strip()
    return index
