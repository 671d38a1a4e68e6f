"""The domain encoder whose features domain-FID, KID and precision/recall
are computed on.

Inception's ImageNet features describe cats and cars, and its weights would
have to be downloaded. Instead each evaluating site trains a small
convolutional autoencoder on its own real images and uses its bottleneck as
the feature space (domain-FID). Its numbers are comparable between runs only
when computed with the same encoder, so it is saved beside the evaluation
and reused when present.
"""

from __future__ import annotations

import io
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from fedgan.atomic import write_atomic

SIZE = 32  # every image is compared at 32×32
FEATURES = 128


class DomainEncoder(nn.Module):
    def __init__(self, channels: int, features: int = FEATURES) -> None:
        super().__init__()
        self.channels = channels
        self.num_features = features  # read by torchmetrics' FID and KID
        self.encode = nn.Sequential(
            nn.Conv2d(channels, 32, 4, 2, 1),  # 16
            nn.LeakyReLU(0.2),
            nn.Conv2d(32, 64, 4, 2, 1),  # 8
            nn.LeakyReLU(0.2),
            nn.Conv2d(64, 128, 4, 2, 1),  # 4
            nn.LeakyReLU(0.2),
            nn.Flatten(),
            nn.Linear(128 * 16, features),
        )
        self.decode = nn.Sequential(
            nn.Linear(features, 128 * 16),
            nn.Unflatten(1, (128, 4, 4)),
            nn.ConvTranspose2d(128, 64, 4, 2, 1),
            nn.LeakyReLU(0.2),
            nn.ConvTranspose2d(64, 32, 4, 2, 1),
            nn.LeakyReLU(0.2),
            nn.ConvTranspose2d(32, channels, 4, 2, 1),
            nn.Tanh(),
        )

    @staticmethod
    def prepare(images: torch.Tensor) -> torch.Tensor:
        images = images.float()
        if images.shape[-1] != SIZE:
            images = F.interpolate(images, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
        return images

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.encode(self.prepare(images))

    def reconstruct(self, images: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(self.prepare(images)))


def train_encoder(
    images: torch.Tensor, *, steps: int = 400, batch: int = 64, seed: int = 0
) -> DomainEncoder:
    """Fit the autoencoder to real images (a few seconds on a CPU)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DomainEncoder(images.shape[1])
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    target_all = DomainEncoder.prepare(images)
    for _ in range(steps):
        idx = torch.randint(0, images.shape[0], (min(batch, images.shape[0]),), generator=gen)
        x = target_all[idx]
        loss = F.mse_loss(model.decode(model.encode(x)), x)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def save(model: DomainEncoder, path: Path) -> None:
    buf = io.BytesIO()
    torch.save(
        {"channels": model.channels, "features": model.num_features, "state": model.state_dict()},
        buf,
    )
    write_atomic(path, buf.getvalue())


def load(path: Path) -> DomainEncoder:
    blob = torch.load(path, map_location="cpu", weights_only=True)
    model = DomainEncoder(int(blob["channels"]), int(blob["features"]))
    model.load_state_dict(blob["state"])
    return model.eval()
