"""Does a feature map see the classes? A check in seconds before a fit of minutes to hours.

A mean-embedding generator learns only what its kernel tells apart: if the mean
embeddings of two adjacent grades are no further apart than those of a random split
of the same images, the release carries no signal for G to draw the difference, and
no fit will put it into the fakes. So for each pair of adjacent classes this prints
the squared distance between their mean embeddings (the biased MMD²) over its mean
when the two classes' labels are shuffled (a permutation test's null), and the share
of labellings, the observed one among them, at least that far (its p-value). About 1
means the kernel cannot tell the two classes apart; well above 1, it can.

    python bench/kernel_separation.py --data synth
    python bench/kernel_separation.py --data synth --set-scales 0.05 0.1 0.2 --permutations 200
    python bench/kernel_separation.py --data digits

The maps: the pixel kernel the product releases; the mean over positions of random
Fourier features of 3×3 patches (`mean_embedding.py --patch-weight`); the two side by
side at each of `--weights` w (the patches' weight, as that bench fits them); and, per
`--set-scales` s, a Gaussian kernel of length s on each image's mean patch embedding
(random Fourier features of it), which compares one image's mix of patches with
another's rather than only the classes' average mix. The data and the split are those
of mean_embedding.py and quality.py (seed 0, 80 % for training); only the training
images are embedded.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Iterator

import torch
from mean_embedding import PatchPixelMap
from quality import digits, held_out_split, synth

from fedgan.privacy.mean_embedding import FeatureMap


def separation(
    emb: torch.Tensor, labels: torch.Tensor, a: int, b: int, permutations: int, seed: int
) -> tuple[float, float]:
    """(observed / mean under shuffling, permutation p-value). The p-value
    counts the observed labelling among the shuffles, so it is never 0."""
    pick = (labels == a) | (labels == b)
    e, is_a = emb[pick].double(), labels[pick] == a

    def dist(mask: torch.Tensor) -> float:
        return float(((e[mask].mean(0) - e[~mask].mean(0)) ** 2).sum())

    seen = dist(is_a)
    gen = torch.Generator().manual_seed(seed)
    null = [dist(is_a[torch.randperm(len(is_a), generator=gen)]) for _ in range(permutations)]
    return seen / (sum(null) / len(null)), (1 + sum(n >= seen for n in null)) / (1 + len(null))


def set_kernel(m: torch.Tensor, scale: float, features: int, seed: int) -> torch.Tensor:
    """Random Fourier features of a Gaussian kernel of length ``scale`` on rows of ``m``."""
    u = torch.randn(m.shape[1], features, generator=torch.Generator().manual_seed(seed)) / scale
    q = m @ u
    return torch.cat([q.cos(), q.sin()], 1) / math.sqrt(features)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default="synth", choices=["digits", "synth"])
    ap.add_argument("--synth-images", type=int, default=1200)
    ap.add_argument("--features", type=int, default=4000, help="pixel kernel, as the bench")
    ap.add_argument("--scale", type=float, default=0.3, help="pixel length scale / √pixels")
    ap.add_argument("--patch-features", type=int, default=1000)
    ap.add_argument("--patch-scale", type=float, default=0.3)
    ap.add_argument("--weights", type=float, nargs="*", default=[0.75], help="of the patches")
    ap.add_argument("--set-scales", type=float, nargs="*", default=[0.05, 0.1, 0.2])
    ap.add_argument("--set-features", type=int, default=500)
    ap.add_argument("--permutations", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.permutations < 1:
        ap.error("--permutations must be at least 1")
    if not all(0 < w <= 1 for w in args.weights):
        ap.error("--weights are in (0, 1]")
    x, y = digits(32) if args.data == "digits" else synth(args.synth_images)
    x, y, _, _ = held_out_split(x, y)
    classes = int(y.max()) + 1
    pixels = FeatureMap(x[0].numel(), args.features, args.scale, seed=args.seed)
    # Only its patch part is read (the same V as mean_embedding.py draws); the
    # weighted maps are put together below, one per --weights.
    patch_map = PatchPixelMap(
        pixels,
        x.shape[1],
        weight=1.0,
        size=3,
        features=args.patch_features,
        length_scale=args.patch_scale,
        positions=0,
        seed=args.seed,
    )
    t = time.perf_counter()
    with torch.no_grad():
        px = torch.cat([pixels(part) for part in x.split(64)])
        patches = torch.cat([patch_map.patch_mean(part) for part in x.split(16)])

    def maps() -> Iterator[tuple[str, torch.Tensor]]:
        yield "pixels", px
        yield "mean 3×3 patch", patches
        for w in args.weights:
            yield (
                f"pixels + patches, w {w:g}",
                torch.cat([math.sqrt(1 - w) * px, math.sqrt(w) * patches], 1),
            )
        for s in args.set_scales:
            yield (
                f"set kernel, length {s:g}",
                set_kernel(patches, s, args.set_features, args.seed + 2),
            )

    gaps = torch.cdist(patches, patches)
    print(
        f"{args.data}: {len(y)} training images, {classes} classes "
        f"{torch.bincount(y, minlength=classes).tolist()}, embedded in "
        f"{time.perf_counter() - t:.0f} s; between two images' mean patch embeddings the "
        f"median distance is {gaps[gaps > 0].median():.3f} (the set kernel's length is on "
        f"that scale)"
    )
    pairs = [(c, c + 1) for c in range(classes - 1)]
    print("| map | " + " | ".join(f"{a} vs {b}" for a, b in pairs) + " |")
    print("| --- |" + " ---: |" * len(pairs))
    for name, emb in maps():
        cells = []
        for a, b in pairs:
            ratio, p = separation(emb, y, a, b, args.permutations, args.seed)
            cells.append(f"{ratio:.1f}× (p {p:.2f})")
        print(f"| {name} | " + " | ".join(cells) + " |")
    print(
        "Each cell: squared distance of the two classes' mean embeddings over its mean "
        f"under {args.permutations} shuffles of their labels (1 = the map cannot tell them "
        "apart), and the permutation p-value."
    )


if __name__ == "__main__":
    main()
