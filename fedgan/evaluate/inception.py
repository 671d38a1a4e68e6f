"""The Inception-v3 network that published FIDs are computed with, for a
consortium that wants a number comparable with the literature beside its
domain-FID.

Its weights are never downloaded: the evaluating site passes a local copy
(``--inception-weights``), the PyTorch port of TensorFlow's 2015-12-05
Inception that pytorch-fid distributes as ``pt_inception-2015-12-05-6726825d.pth``.
That network differs from torchvision's ImageNet Inception (1008 classes,
average pools that ignore padding, a max pool in the last block), and the
differences move FID, so the blocks are written out here rather than borrowed
from torchvision, which would also be a dependency that must match our torch.

The file is read with ``torch.load(weights_only=True)``: a weights file
cannot run code, and one whose tensors do not fit this network is refused
with the first key that does not.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from fedgan.errors import FedGanError

FEATURES = 2048
INPUT_SIZE = 299
# torch.hub names a file by the first hex digits of its SHA-256; the FID
# weights file carries this prefix.
STANDARD_SHA256_PREFIX = "6726825d"
FID_CLASSES = 1008


class InceptionWeightsError(FedGanError):
    """The --inception-weights file cannot be used; says which and why."""


class _Conv(nn.Module):
    """Convolution, batch norm (TensorFlow's ε), ReLU: the unit of every block."""

    def __init__(self, cin: int, cout: int, kernel, stride=1, padding=0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _tf_avg_pool(x: torch.Tensor) -> torch.Tensor:
    # TensorFlow's average pool leaves the zero padding out of the mean.
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class _BlockA(nn.Module):
    def __init__(self, cin: int, pool: int) -> None:
        super().__init__()
        self.branch1x1 = _Conv(cin, 64, 1)
        self.branch5x5_1 = _Conv(cin, 48, 1)
        self.branch5x5_2 = _Conv(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = _Conv(cin, 64, 1)
        self.branch3x3dbl_2 = _Conv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = _Conv(96, 96, 3, padding=1)
        self.branch_pool = _Conv(cin, pool, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat(
            [
                self.branch1x1(x),
                self.branch5x5_2(self.branch5x5_1(x)),
                self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                self.branch_pool(_tf_avg_pool(x)),
            ],
            1,
        )


class _BlockB(nn.Module):
    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch3x3 = _Conv(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = _Conv(cin, 64, 1)
        self.branch3x3dbl_2 = _Conv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = _Conv(96, 96, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat(
            [
                self.branch3x3(x),
                self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                F.max_pool2d(x, kernel_size=3, stride=2),
            ],
            1,
        )


class _BlockC(nn.Module):
    def __init__(self, cin: int, c7: int) -> None:
        super().__init__()
        row, col = ((1, 7), (0, 3)), ((7, 1), (3, 0))
        self.branch1x1 = _Conv(cin, 192, 1)
        self.branch7x7_1 = _Conv(cin, c7, 1)
        self.branch7x7_2 = _Conv(c7, c7, row[0], padding=row[1])
        self.branch7x7_3 = _Conv(c7, 192, col[0], padding=col[1])
        self.branch7x7dbl_1 = _Conv(cin, c7, 1)
        self.branch7x7dbl_2 = _Conv(c7, c7, col[0], padding=col[1])
        self.branch7x7dbl_3 = _Conv(c7, c7, row[0], padding=row[1])
        self.branch7x7dbl_4 = _Conv(c7, c7, col[0], padding=col[1])
        self.branch7x7dbl_5 = _Conv(c7, 192, row[0], padding=row[1])
        self.branch_pool = _Conv(cin, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dbl = x
        for i in range(1, 6):
            dbl = getattr(self, f"branch7x7dbl_{i}")(dbl)
        return torch.cat(
            [
                self.branch1x1(x),
                self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x))),
                dbl,
                self.branch_pool(_tf_avg_pool(x)),
            ],
            1,
        )


class _BlockD(nn.Module):
    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch3x3_1 = _Conv(cin, 192, 1)
        self.branch3x3_2 = _Conv(192, 320, 3, stride=2)
        self.branch7x7x3_1 = _Conv(cin, 192, 1)
        self.branch7x7x3_2 = _Conv(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = _Conv(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = _Conv(192, 192, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x
        for i in range(1, 5):
            b = getattr(self, f"branch7x7x3_{i}")(b)
        return torch.cat(
            [self.branch3x3_2(self.branch3x3_1(x)), b, F.max_pool2d(x, kernel_size=3, stride=2)],
            1,
        )


class _BlockE(nn.Module):
    """``max_pool``: the FID network's last block pools with max, not average
    (a quirk of the TensorFlow graph that the published numbers include)."""

    def __init__(self, cin: int, max_pool: bool) -> None:
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = _Conv(cin, 320, 1)
        self.branch3x3_1 = _Conv(cin, 384, 1)
        self.branch3x3_2a = _Conv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = _Conv(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = _Conv(cin, 448, 1)
        self.branch3x3dbl_2 = _Conv(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = _Conv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = _Conv(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = _Conv(cin, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_1(x)
        d3 = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        if self.max_pool:
            pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        else:
            pooled = _tf_avg_pool(x)
        return torch.cat(
            [
                self.branch1x1(x),
                self.branch3x3_2a(b3),
                self.branch3x3_2b(b3),
                self.branch3x3dbl_3a(d3),
                self.branch3x3dbl_3b(d3),
                self.branch_pool(pooled),
            ],
            1,
        )


class FidInception(nn.Module):
    """Images N×C×H×W in [-1, 1] (C = 1 or 3, any size) to the 2,048 pooled
    features FID is defined on. Gray images are repeated to three channels
    and everything is resized to 299×299, as the published FIDs did."""

    num_features = FEATURES  # read by torchmetrics' FID

    def __init__(self) -> None:
        super().__init__()
        self.Conv2d_1a_3x3 = _Conv(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = _Conv(32, 32, 3)
        self.Conv2d_2b_3x3 = _Conv(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = _Conv(64, 80, 1)
        self.Conv2d_4a_3x3 = _Conv(80, 192, 3)
        self.Mixed_5b = _BlockA(192, 32)
        self.Mixed_5c = _BlockA(256, 64)
        self.Mixed_5d = _BlockA(288, 64)
        self.Mixed_6a = _BlockB(288)
        self.Mixed_6b = _BlockC(768, 128)
        self.Mixed_6c = _BlockC(768, 160)
        self.Mixed_6d = _BlockC(768, 160)
        self.Mixed_6e = _BlockC(768, 192)
        self.Mixed_7a = _BlockD(768)
        self.Mixed_7b = _BlockE(1280, max_pool=False)
        self.Mixed_7c = _BlockE(2048, max_pool=True)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float()
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, f"Mixed_{name}")(x)
        return F.adaptive_avg_pool2d(x, 1).flatten(1)


def load(path: Path) -> tuple[FidInception, str]:
    """The network with the file's weights, and the file's SHA-256. The
    classifier head (``fc``) is not needed for features and is ignored;
    ``num_batches_tracked`` counters, which older ports lack, may be absent."""
    path = Path(path)
    if not path.is_file():
        raise InceptionWeightsError(
            f"--inception-weights {path} not found: copy pt_inception-2015-12-05-6726825d.pth "
            "(pytorch-fid's FID weights) to the site and pass its path"
        )
    # The bytes hashed are the bytes loaded: no window for the file to change.
    data = path.read_bytes()
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for a bad file
        raise InceptionWeightsError(
            f"--inception-weights {path} is not a PyTorch weights file ({type(exc).__name__}); "
            "pass pytorch-fid's pt_inception-2015-12-05-6726825d.pth"
        ) from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise InceptionWeightsError(
            f"--inception-weights {path} holds no state dict; pass pytorch-fid's "
            "pt_inception-2015-12-05-6726825d.pth"
        )
    fc = state.get("fc.weight")
    if isinstance(fc, torch.Tensor) and fc.shape[0] != FID_CLASSES:
        raise InceptionWeightsError(
            f"--inception-weights {path} is an Inception with {fc.shape[0]} classes (torchvision's "
            f"ImageNet one?), not the FID network ({FID_CLASSES}); pass pytorch-fid's "
            "pt_inception-2015-12-05-6726825d.pth"
        )
    model = FidInception()
    expected = model.state_dict()
    for key, tensor in expected.items():
        if key.endswith("num_batches_tracked") and key not in state:
            continue
        got = state.get(key)
        if not isinstance(got, torch.Tensor) or got.shape != tensor.shape:
            found = "missing" if got is None else f"shape {tuple(getattr(got, 'shape', ()))}"
            raise InceptionWeightsError(
                f"--inception-weights {path}: {key} is {found}, the FID Inception needs "
                f"{tuple(tensor.shape)}; pass pytorch-fid's pt_inception-2015-12-05-6726825d.pth"
            )
    model.load_state_dict({k: state[k] for k in expected if k in state}, strict=False)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval(), hashlib.sha256(data).hexdigest()


def is_standard(sha256: str) -> bool:
    """Whether the weights are the file published FIDs used (by the hash
    prefix torch.hub names it with): only then compare with the literature."""
    return sha256.startswith(STANDARD_SHA256_PREFIX)
