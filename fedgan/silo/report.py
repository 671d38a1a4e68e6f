"""What reading a silo found: usable images, skipped files with reasons,
counts. Paths are relative to the silo; no pixel values, no patient tags."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any


class SkipFile(Exception):
    """Raised by a decoder for a file it will not use; the message is the
    reason shown to the site's operator (never a tag value)."""


@dataclass
class SiloReport:
    directory: str
    kind: str
    images: int = 0
    files_read: int = 0
    labels: Counter[str] = field(default_factory=Counter)
    sizes: Counter[str] = field(default_factory=Counter)
    modalities: Counter[str] = field(default_factory=Counter)
    sop_classes: Counter[str] = field(default_factory=Counter)  # DICOM: images per SOP class
    skipped: list[tuple[str, str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    cached: bool = False

    def skip(self, path: str, reason: str) -> None:
        self.skipped.append((path, reason))

    def to_dict(self) -> dict[str, Any]:
        return {
            "directory": self.directory,
            "kind": self.kind,
            "images": self.images,
            "files_read": self.files_read,
            "labels": dict(sorted(self.labels.items())),
            "sizes": dict(self.sizes.most_common()),
            "modalities": dict(sorted(self.modalities.items())),
            "sop_classes": dict(sorted(self.sop_classes.items())),
            "skipped": [{"path": p, "reason": r} for p, r in self.skipped],
            "warnings": self.warnings,
            "cached": self.cached,
        }

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> SiloReport:
        return cls(
            directory=doc["directory"],
            kind=doc["kind"],
            images=doc["images"],
            files_read=doc["files_read"],
            labels=Counter(doc["labels"]),
            sizes=Counter(doc["sizes"]),
            modalities=Counter(doc["modalities"]),
            sop_classes=Counter(doc.get("sop_classes", {})),
            skipped=[(s["path"], s["reason"]) for s in doc["skipped"]],
            warnings=list(doc["warnings"]),
            cached=doc.get("cached", False),
        )

    def summary_lines(self) -> list[str]:
        lines = [
            f"silo      {self.directory} ({self.kind})",
            f"usable    {self.images} images from {self.files_read} files"
            + (" (from cache)" if self.cached else ""),
        ]
        if self.labels:
            lines.append(
                "labels    " + ", ".join(f"{k}: {v}" for k, v in sorted(self.labels.items()))
            )
        if self.modalities:
            lines.append(
                "modality  " + ", ".join(f"{k}: {v}" for k, v in sorted(self.modalities.items()))
            )
        if self.sizes:
            lines.append(
                "sizes     " + ", ".join(f"{k}: {v}" for k, v in self.sizes.most_common(8))
            )
        lines.extend(f"warning   {w}" for w in self.warnings)
        if self.skipped:
            lines.append(f"skipped   {len(self.skipped)} files")
            lines.extend(f"  {path}: {reason}" for path, reason in self.skipped)
        return lines


# Objects that decode to pixels but are not pictures of anatomy: a generator
# trained on them beside images learns a mixture.
NOT_IMAGES = {
    "RT Dose Storage": "dose grids",
    "Segmentation Storage": "segmentation masks",
    "Label Map Segmentation Storage": "segmentation masks",
}


def content_warnings(report: SiloReport, image_size: int) -> list[str]:
    """What makes a silo a poor training set though every file decoded:
    mixed modalities, images smaller than the run's size, dose grids and
    segmentation objects, labels missing for most images. Counts only."""
    out = []
    if len(report.modalities) > 1:
        mix = ", ".join(f"{m}: {n}" for m, n in report.modalities.most_common())
        out.append(
            f"mixed modalities ({mix}): one generator learns one kind of image; keep one with "
            "the modality option (e.g. modality=CT)"
        )
    small = sum(n for size, n in report.sizes.items() if min(_dims(size)) < image_size)
    if small:
        out.append(
            f"{small} of {report.images} images are smaller than the run's {image_size} px: "
            "they are upscaled, and blurred"
        )
    for sop, what in NOT_IMAGES.items():
        if report.sop_classes.get(sop):
            out.append(
                f"{report.sop_classes[sop]} images are {what} ({sop}), not pictures of anatomy; "
                "move them out of the silo"
            )
    unlabelled = report.labels.get("(none)", 0)
    if report.images and unlabelled < report.images and unlabelled > report.images / 2:
        out.append(
            f"{unlabelled} of {report.images} images have no label: a class-conditional run "
            "leaves them out"
        )
    return out


def _dims(size: str) -> tuple[int, int]:
    width, _, height = size.partition("x")
    return int(width), int(height)
