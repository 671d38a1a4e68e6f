"""`fedgan evaluate`: one site measures a run's synthetic images against its
own real images, at the site. Real images never leave it; what it writes is
numbers (``<run>/evaluation/<site>.json``) and the domain encoder it trained
(``<run>/evaluation/<site>-encoder.pt``), which holds no images.

Members are the site's training silo (``--real``); non-members are images
the site held out of training (``--holdout``). Without a holdout the
membership-inference attacks cannot be run and the report says so.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from fedgan.atomic import write_text_atomic
from fedgan.config.run import parse_classes
from fedgan.errors import FedGanError
from fedgan.evaluate import encoder as domain
from fedgan.evaluate import inception, metrics
from fedgan.evaluate.results import EVALUATION_DIR
from fedgan.evaluate.utility import anomaly_auc, tstr
from fedgan.gan.models import Discriminator
from fedgan.silo.loader import load_silo
from fedgan.silo.options import SiloOptions
from fedgan.synthetic import generate, load_generator


class EvaluationError(FedGanError):
    """The run or the real images cannot be evaluated; says which and why."""


def run_settings(run_dir: Path) -> dict[str, Any]:
    """The run's configuration as its folder records it (classes, attributes)."""
    for name in ("run-config.json", "run-config.toml"):
        path = run_dir / name
        if path.exists():
            text = path.read_text("utf-8")
            return json.loads(text) if name.endswith(".json") else tomllib.loads(text)
    return {}


def _images(directory: Path, kind: str, spec, options: dict[str, str], classes: tuple[str, ...]):
    data = load_silo(
        Path(directory), SiloOptions.from_mapping(kind, spec.image_size, spec.channels, options)
    ).require_images(str(directory))
    images = torch.from_numpy(data.as_float())
    labels = None
    if classes:
        index = {c: i for i, c in enumerate(classes)}
        keep = [i for i, lab in enumerate(data.labels) if lab in index]
        images = images[keep]
        labels = torch.tensor([index[data.labels[i]] for i in keep], dtype=torch.long)
    return images, labels


def _disc_scores(disc: Discriminator, images: torch.Tensor, labels: torch.Tensor | None):
    with torch.no_grad():
        out = [
            disc(images[i : i + 256], None if labels is None else labels[i : i + 256])
            for i in range(0, images.shape[0], 256)
        ]
    return torch.cat(out)


def _inception_fid(
    net: torch.nn.Module, real: torch.Tensor, fake: torch.Tensor, say: Callable[[str], None]
) -> float:
    """Minutes on a CPU (299×299 Inception), so progress every tenth."""
    shown = [0]

    def progress(done: int, total: int) -> None:
        tenth = 10 * done // total
        if tenth > shown[0]:
            shown[0] = tenth
            say(f"inception     {done}/{total} images")

    return metrics.fid_chunked(real, fake, net, progress=progress)


def evaluate(
    run_dir: Path,
    real: Path,
    kind: str,
    *,
    site_id: str,
    holdout: Path | None = None,
    silo_options: dict[str, str] | None = None,
    n_synthetic: int = 512,
    seed: int = 0,
    encoder_steps: int = 400,
    classifier_seeds: int = 3,
    classifier_steps: int = 300,
    normal_class: str | None = None,
    encoder_path: Path | None = None,
    inception_weights: Path | None = None,
    say: Callable[[str], None] = print,
) -> Path:
    """``normal_class`` (a class of a conditional run): also train the
    anomaly detector on synthetic images of that class and score the
    held-out images; it is an autoencoder trained for ``encoder_steps``,
    as the domain encoder is. ``inception_weights`` (a local file): also the
    Inception FID that published numbers use. TSTR and train-on-real are
    each the mean of ``classifier_seeds`` classifiers: one is quicker, but its
    figure moves by up to ±0.09 with its seed (bench/RESULTS.md)."""
    run_dir = Path(run_dir)
    if classifier_seeds < 1:
        raise EvaluationError(f"--classifier-seeds {classifier_seeds}: use 1 or more")
    started = time.perf_counter()
    inception_net = None
    if inception_weights is not None:
        # Loaded first: a wrong file should fail before minutes of work.
        inception_net, inception_sha = inception.load(inception_weights)
    gen = load_generator(run_dir / "generator.pt")
    spec = gen.spec
    settings = run_settings(run_dir)
    classes = parse_classes(str(settings.get("classes", ""))) if spec.num_classes else ()
    if spec.num_classes and len(classes) != spec.num_classes:
        raise EvaluationError(
            f"{run_dir}: the generator has {spec.num_classes} classes but the run folder does "
            "not name them (run-config.json); evaluate it where it was run"
        )
    if normal_class is not None:
        # Checked before minutes of work, not after.
        if normal_class not in classes:
            raise EvaluationError(
                f"--normal-class {normal_class!r} is not one of the run's classes "
                f"({', '.join(classes) or 'the run is not class-conditional'})"
            )
        if holdout is None:
            raise EvaluationError("the anomaly detector needs held-out images: pass --holdout")
    options = silo_options or {}
    members, member_labels = _images(real, kind, spec, options, classes)
    say(f"real          {members.shape[0]} training images from {real}")
    held = held_labels = None
    if holdout is not None:
        held, held_labels = _images(holdout, kind, spec, options, classes)
        say(f"held out      {held.shape[0]} images from {holdout}")
    fake, fake_labels = generate(
        gen, n_synthetic, seed=seed, attributes=str(settings.get("attributes", ""))
    )
    say(f"synthetic     {fake.shape[0]} images from {run_dir / 'generator.pt'}")

    out_dir = run_dir / EVALUATION_DIR
    enc_path = Path(encoder_path) if encoder_path else out_dir / f"{site_id}-encoder.pt"
    if encoder_path and not enc_path.exists():
        raise EvaluationError(f"--encoder {enc_path} not found")
    if enc_path.exists():
        enc = domain.load(enc_path)
        say(f"encoder       {enc_path} (reused: numbers stay comparable)")
    else:
        enc = domain.train_encoder(members, steps=encoder_steps, seed=seed)
        domain.save(enc, enc_path)
        say(f"encoder       trained on the real images, saved to {enc_path}")

    real_all = members if held is None else torch.cat([members, held])
    result: dict[str, Any] = {
        "site": site_id,
        "run": run_dir.name,
        "time": time.time(),
        "images": {
            "members": int(members.shape[0]),
            "held_out": 0 if held is None else int(held.shape[0]),
            "synthetic": int(fake.shape[0]),
        },
        "encoder": enc_path.name,
        # Which encoder: domain-FIDs compare only on the same one.
        "encoder_sha256": hashlib.sha256(enc_path.read_bytes()).hexdigest(),
    }
    with torch.no_grad():
        fid, kid = metrics.fid_kid(real_all, fake, enc)
        precision, recall = metrics.precision_recall(enc(real_all), enc(fake))
    ssim, psnr = metrics.ssim_psnr_to_nearest(fake, real_all)
    quality: dict[str, Any] = {
        "domain_fid": fid,
        "domain_kid_x1000": kid,
        "precision": precision,
        "recall": recall,
        "ssim_nearest": ssim,
        "psnr_nearest_db": psnr if math.isfinite(psnr) else None,
    }
    disc = None
    ckpt_path = run_dir / "checkpoint.pt"
    # A mean-embedding run trains no D: its checkpoint's D is the untrained
    # initial one, whose realism and membership scores would mean nothing.
    if ckpt_path.exists() and settings.get("mechanism", "dp-sgd") != "mean-embedding":
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        disc = Discriminator(spec)
        disc.load_state_dict(ckpt["disc"])
        disc.eval()
        quality["realism"] = float(torch.sigmoid(_disc_scores(disc, fake, fake_labels)).mean())
    result["quality"] = quality
    say(
        f"quality       domain-FID {fid:.2f}  KID×1000 {kid:.2f}  precision {precision:.2f}  "
        f"recall {recall:.2f}  SSIM {ssim:.3f}"
    )
    if inception_net is not None:
        quality["inception_fid"] = _inception_fid(inception_net, real_all, fake, say)
        standard = inception.is_standard(inception_sha)
        result["inception_weights"] = {
            "file": Path(inception_weights).name,
            "sha256": inception_sha,
            "standard": standard,
        }
        say(
            f"quality       Inception FID {quality['inception_fid']:.2f}"
            + (
                ""
                if standard
                else "  (weights are not pt_inception-2015-12-05-6726825d: not comparable "
                "with published FIDs)"
            )
        )

    memorized, threshold, _ = metrics.memorization(fake, members, held)
    privacy: dict[str, Any] = {"memorized_fraction": memorized, "memorization_threshold": threshold}
    if held is not None and held.shape[0] >= 2:
        privacy["mia_generator_auc"] = metrics.mia_generator_auc(fake, members, held)
        if disc is not None:
            privacy["mia_discriminator_auc"] = metrics.auc(
                _disc_scores(disc, members, member_labels), _disc_scores(disc, held, held_labels)
            )
    else:
        privacy["mia"] = "not run: pass --holdout with images this site kept out of training"
    result["privacy"] = privacy
    say(
        f"privacy       memorized {memorized:.1%}"
        + "".join(
            f"  {k.replace('_', ' ')} {v:.3f}" for k, v in privacy.items() if k.startswith("mia_")
        )
    )

    if classes and held is not None and fake_labels is not None and held_labels is not None:
        # A second draw at this site's own class mix (its counts stay here).
        at_mix = generate(
            gen,
            n_synthetic,
            seed=seed + 1,
            class_weights=torch.bincount(member_labels, minlength=len(classes)).tolist(),
            attributes=str(settings.get("attributes", "")),
        )
        assert at_mix[1] is not None
        result["utility"] = tstr(
            fake,
            fake_labels,
            members,
            member_labels,
            held,
            held_labels,
            len(classes),
            seed=seed,
            seeds=classifier_seeds,
            steps=classifier_steps,
            at_mix=(at_mix[0], at_mix[1]),
        )
        u = result["utility"]
        several = classifier_seeds > 1

        def figure(key: str) -> str:
            return f"{u[key]:.3f}" + (f" ± {u[key + '_sd']:.3f}" if several else "")

        say(
            f"utility       TSTR accuracy {figure('tstr_accuracy')} vs train-on-real "
            f"{figure('trtr_accuracy')} ({u['tstr_ratio']:.0%}; "
            + (
                f"mean ± s.d. of {classifier_seeds} classifiers"
                if several
                else "one classifier, its seed alone moves it by up to ±0.09"
            )
            + f"); at this site's class mix {u['tstr_mix_accuracy']:.3f} "
            f"({u['tstr_mix_ratio']:.0%})"
        )
    if normal_class is not None:
        normal = classes.index(normal_class)
        fake_normal, _ = generate(gen, n_synthetic, seed=seed + 1, class_index=normal)
        anomaly = anomaly_auc(
            fake_normal, held, held_labels != normal, steps=encoder_steps, seed=seed
        )
        result.setdefault("utility", {}).update(anomaly, normal_class=normal_class)
        say(
            f"anomaly       AUC {anomaly['anomaly_auc']:.3f} (normal: {normal_class}); "
            f"{anomaly['anomaly_detected']:.0%} of abnormal held-out images flagged"
        )
    result["seconds"] = round(time.perf_counter() - started, 1)
    path = out_dir / f"{site_id}.json"
    write_text_atomic(path, json.dumps(result, indent=1, sort_keys=True))
    return path
