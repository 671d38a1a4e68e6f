"""The FID Inception: its layout matches the published weights file's keys,
its features give FID's known answers, and a wrong weights file is refused
with a line that names it. The real weights cannot be downloaded here, so
the file is written from a seeded network with the same keys
(`tests/inception_weights.py`)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedgan.evaluate import inception, metrics
from tests import inception_weights as stand_in
from tests.images import blobs as _blobs


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> tuple[inception.FidInception, Path]:
    """The network and a weights file laid out as pytorch-fid's (with the
    1008-class head and without batch-norm counters)."""
    net = stand_in.network()
    return net, stand_in.write(net, tmp_path_factory.mktemp("inception") / "pt_inception-test.pth")


def test_the_layout_is_the_fid_networks():
    net = inception.FidInception()
    # torchvision's Inception-v3 has 27.16 M parameters; without its 1000-class
    # head (2.05 M) and auxiliary classifier (3.33 M) 21.79 M remain.
    assert sum(p.numel() for p in net.parameters()) == 21_785_568
    keys = net.state_dict().keys()
    assert "Mixed_7c.branch3x3dbl_3b.bn.running_var" in keys and "Conv2d_1a_3x3.conv.weight" in keys
    assert not any(k.startswith(("fc.", "AuxLogits")) for k in keys)


def test_gray_and_colour_images_of_any_size_give_2048_features(weights):
    net, _ = weights
    with torch.no_grad():
        gray = net(_blobs(2, 0))
        colour = net(torch.rand(2, 3, 64, 64) * 2 - 1)
    assert gray.shape == colour.shape == (2, inception.FEATURES)
    assert torch.isfinite(gray).all() and gray.abs().mean() > 1e-3


def test_fid_known_answers(weights):
    net, _ = weights
    real = _blobs(8, 1)
    same = metrics.fid_chunked(real, real.clone(), net, chunk=3)
    alike = metrics.fid_chunked(real, _blobs(8, 2), net)
    shifted = metrics.fid_chunked(real, _blobs(8, 2, shift=1.5), net)
    assert abs(same) < 1e-2 * alike
    assert shifted > 10 * alike


def test_the_weights_file_loads_and_is_named_by_its_hash(weights):
    net, path = weights
    loaded, sha = inception.load(path)
    x = _blobs(2, 3)
    with torch.no_grad():
        assert torch.allclose(loaded(x), net(x))
    assert len(sha) == 64 and not inception.is_standard(sha)
    assert inception.is_standard(inception.STANDARD_SHA256_PREFIX + "0" * 56)
    assert not any(p.requires_grad for p in loaded.parameters())


def test_a_wrong_weights_file_is_refused_naming_the_file_and_the_fix(weights, tmp_path):
    _, good = weights
    state = torch.load(good, weights_only=True)
    missing = dict(state)
    del missing["Mixed_6b.branch7x7_2.conv.weight"]
    imagenet = dict(state, **{"fc.weight": torch.zeros(1000, 2048)})
    cases = {
        "missing.pth": (missing, "Mixed_6b.branch7x7_2.conv.weight is missing"),
        "imagenet.pth": (imagenet, "1000 classes"),
    }
    for name, (content, why) in cases.items():
        torch.save(content, tmp_path / name)
        with pytest.raises(inception.InceptionWeightsError, match=why) as err:
            inception.load(tmp_path / name)
        assert str(tmp_path / name) in str(err.value)
        assert "pt_inception-2015-12-05-6726825d.pth" in str(err.value)
    (tmp_path / "junk.pth").write_bytes(b"not a weights file")
    with pytest.raises(inception.InceptionWeightsError, match="not a PyTorch weights file"):
        inception.load(tmp_path / "junk.pth")
