"""What both networks' shapes depend on, as a plain type: the run's settings
and the round contract carry it; `fedgan.gan.models` builds G and D from it.
Here, and not beside the models, so that configuration needs no torch."""

from __future__ import annotations

import math
from dataclasses import dataclass

SUPPORTED_SIZES = (16, 32, 64, 128)


@dataclass(frozen=True)
class GanSpec:
    """What both networks' shapes depend on; sent with every round."""

    image_size: int = 32
    channels: int = 3
    latent_dim: int = 64
    width: int = 32
    # > 0: class-conditional (label embedding in G, projection discriminator).
    num_classes: int = 0
    # > 0: conditioned on a vector of tabular attributes (concatenated to G's
    # latent; an attribute head on D's features, trained with a cosine loss).
    attr_dim: int = 0

    def __post_init__(self) -> None:
        if self.image_size not in SUPPORTED_SIZES:
            raise ValueError(
                f"image-size {self.image_size} is not supported; use one of {SUPPORTED_SIZES}"
            )
        if self.channels not in (1, 3):
            raise ValueError(f"channels {self.channels} is not supported; use 1 or 3")
        if self.latent_dim < 1 or self.width < 4:
            raise ValueError("latent-dim must be >= 1 and width >= 4")
        if self.num_classes < 0 or self.num_classes == 1:
            raise ValueError("a conditional model needs at least 2 classes")
        if self.attr_dim < 0:
            raise ValueError("attr-dim must be >= 0")

    @classmethod
    def declared(
        cls,
        image_size: int,
        channels: int,
        latent_dim: int,
        width: int,
        classes: tuple[str, ...],
        attributes: str,
    ) -> GanSpec:
        """The spec of a run that names its classes and declares its
        attributes (e.g. "age=0:100,sex=F|M"): the form the run settings and
        the round contract carry."""
        from fedgan.attributes import parse
        from fedgan.attributes import width as attribute_width

        return cls(
            image_size=image_size,
            channels=channels,
            latent_dim=latent_dim,
            width=width,
            num_classes=len(classes),
            attr_dim=attribute_width(parse(attributes)),
        )

    @property
    def blocks(self) -> int:
        """Resolution doublings between the 4x4 seed and the image."""
        return int(math.log2(self.image_size // 4))
