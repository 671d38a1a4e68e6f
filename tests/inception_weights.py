"""A stand-in for pytorch-fid's FID weights file, which cannot be downloaded
here: a seeded network laid out as that file is (1008-class head, no
batch-norm counters)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from fedgan.evaluate import inception


def network(seed: int = 0) -> inception.FidInception:
    """Activations keep their scale through the 94 layers (the default init
    shrinks them to ~1e-8, which would make every FID 0)."""
    torch.manual_seed(seed)
    net = inception.FidInception().eval()
    for module in net.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    return net


def write(net: inception.FidInception, path: Path) -> Path:
    state = {k: v for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
    state["fc.weight"] = torch.zeros(inception.FID_CLASSES, inception.FEATURES)
    state["fc.bias"] = torch.zeros(inception.FID_CLASSES)
    torch.save(state, path)
    return path
