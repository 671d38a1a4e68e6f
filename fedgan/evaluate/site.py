"""`fedgan evaluate`: one site measures a run's synthetic images against its
own real images, at the site. Real images never leave it; what it writes is
numbers (``<run>/evaluation/<site>.json``) and the domain encoder it trained
(``<run>/evaluation/<site>-encoder.pt``), which holds no images.

Members are the site's training silo (``--real``); non-members are images
the site held out of training (``--holdout``). Without a holdout the
membership-inference attacks cannot be run and the report says so.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
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
from fedgan.gan.models import Discriminator, Generator
from fedgan.silo.loader import load_silo
from fedgan.silo.options import SiloOptions
from fedgan.synthetic import generate, load_generator


class EvaluationError(FedGanError):
    """The run or the real images cannot be evaluated; says which and why."""


# Below these, the numbers flatter rather than measure, so the evaluation
# refuses. With a handful of real images every k-NN ball covers everything
# (precision and realism 1.00 for pure noise against 6 images) and FID's
# covariance is mostly its estimation error. A membership AUC's standard
# error with n images a side is about √(1/(6n)) near 0.5 (Hanley and McNeil):
# 0.09 at 20, so an AUC there is read only against 0.5 ± 0.18.
MIN_REAL = 40  # members and held-out images together: FID, KID, precision/recall
MIN_MIA = 20  # members, and held-out images, each: the membership attacks


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


@dataclass(frozen=True)
class _Effort:
    """How much each measurement draws and trains: more is slower and its
    figures move less with the seed."""

    n_synthetic: int
    seed: int
    encoder_steps: int
    classifier_seeds: int
    classifier_steps: int


@dataclass(frozen=True)
class _Run:
    """The run as this site evaluates it: its generator, the configuration
    its folder records and, for a conditional run, its class names."""

    dir: Path
    gen: Generator
    settings: dict[str, Any]
    classes: tuple[str, ...]

    @property
    def attributes(self) -> str:
        return str(self.settings.get("attributes", ""))


@dataclass(frozen=True)
class _Images:
    """The site's members (its training silo), its held-out images (None
    without ``--holdout``) and the synthetic draw, with class indices where
    the run is conditional."""

    members: torch.Tensor
    member_labels: torch.Tensor | None
    held: torch.Tensor | None
    held_labels: torch.Tensor | None
    fake: torch.Tensor
    fake_labels: torch.Tensor | None

    @functools.cached_property
    def real(self) -> torch.Tensor:
        """Members and held-out images together: what quality is measured on."""
        return self.members if self.held is None else torch.cat([self.members, self.held])

    @property
    def classified_holdout(self) -> bool:
        """Held-out and synthetic images with classes: what TSTR needs."""
        return (
            self.held is not None and self.fake_labels is not None and self.held_labels is not None
        )


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
    start: Path | None = None,
    say: Callable[[str], None] = print,
) -> Path:
    """``normal_class`` (a class of a conditional run): also train the
    anomaly detector on synthetic images of that class and score the
    held-out images; it is an autoencoder trained for ``encoder_steps``,
    as the domain encoder is. ``inception_weights`` (a local file): also the
    Inception FID that published numbers use. ``start``: the generator the
    federation started from (its `fedgan pretrain` init file): also its
    domain-FID on the same encoder, so the site sees what the federation
    added to the public starting point. TSTR and train-on-real are
    each the mean of ``classifier_seeds`` classifiers: one is quicker, but its
    figure moves by up to ±0.09 with its seed (bench/RESULTS.md)."""
    if classifier_seeds < 1:
        raise EvaluationError(f"--classifier-seeds {classifier_seeds}: use 1 or more")
    effort = _Effort(n_synthetic, seed, encoder_steps, classifier_seeds, classifier_steps)
    started = time.perf_counter()
    # Loaded first: a wrong file should fail before minutes of work.
    weights = inception.load(inception_weights) if inception_weights is not None else None
    run = _open_run(Path(run_dir))
    start_gen = _start_generator(Path(start), run) if start is not None else None
    _check_normal_class(normal_class, run.classes, holdout)
    images = _read_images(run, real, holdout, kind, silo_options or {}, effort, say)
    out_dir = run.dir / EVALUATION_DIR
    enc_path = Path(encoder_path) if encoder_path else out_dir / f"{site_id}-encoder.pt"
    enc = _domain_encoder(enc_path, bool(encoder_path), images.members, effort, say)
    result = _summary(run, site_id, images, enc_path)
    quality, disc = _quality(run, images, enc, say)
    result["quality"] = quality
    if start_gen is not None:
        quality["domain_fid_start"] = _start_fid(start_gen, run, images, effort, enc, say)
    if weights is not None:
        net, sha = weights
        quality["inception_fid"] = _inception_fid(net, images.real, images.fake, say)
        result["inception_weights"] = _inception_weights(Path(inception_weights), sha, quality, say)
    result["privacy"] = _privacy(images, disc, say)
    if run.classes and images.classified_holdout:
        result["utility"] = _utility(run, images, effort, say)
    if normal_class is not None:
        anomaly = _anomaly(run, images, normal_class, effort, say)
        result.setdefault("utility", {}).update(anomaly, normal_class=normal_class)
    result["seconds"] = round(time.perf_counter() - started, 1)
    path = out_dir / f"{site_id}.json"
    write_text_atomic(path, json.dumps(result, indent=1, sort_keys=True))
    return path


def _start_generator(path: Path, run: _Run) -> Generator:
    """The generator the run started from; an init file whose weights are not
    the ones the run recorded is refused, so the comparison is with the real
    starting point."""
    from fedgan.config.run import ConfigError
    from fedgan.model_init import load_init

    recorded = run.settings.get("model-init-record")
    if isinstance(recorded, dict) and recorded.get("weights_sha256"):
        try:
            init = load_init(path, key="--start")
        except ConfigError as exc:
            raise EvaluationError(str(exc)) from None
        if init.weights_sha256 != recorded["weights_sha256"]:
            raise EvaluationError(
                f"--start {path} is not the init the run started from (its weights SHA-256 "
                f"{init.weights_sha256[:16]}…, the run's {recorded['weights_sha256'][:16]}…)"
            )
    return load_generator(path)


def _start_fid(
    gen: Generator,
    run: _Run,
    images: _Images,
    effort: _Effort,
    enc: torch.nn.Module,
    say: Callable[[str], None],
) -> float:
    if gen.spec != run.gen.spec:
        raise EvaluationError(
            "--start: that generator's model differs from the run's; give the init file the "
            "run started from (run-config.json, model-init-record)"
        )
    fake, _ = generate(gen, effort.n_synthetic, seed=effort.seed, attributes=run.attributes)
    with torch.no_grad():
        fid, _ = metrics.fid_kid(images.real, fake, enc)
    say(f"start         domain-FID {fid:.2f} of the generator the federation started from")
    return fid


def _check_enough(members: torch.Tensor, held: torch.Tensor | None) -> None:
    """Refuse, in one line naming the minimum, before any minute of work."""
    n = members.shape[0] + (0 if held is None else held.shape[0])
    if n < MIN_REAL:
        raise EvaluationError(
            f"{n} real images: FID, KID and precision/recall need at least {MIN_REAL} "
            "(--real and --holdout together), or they flatter any generator; evaluate at a "
            "site with more images"
        )
    if held is not None:
        m, h = members.shape[0], held.shape[0]
        if min(m, h) < MIN_MIA:
            raise EvaluationError(
                f"{m} members and {h} held-out images: the membership attacks need at "
                f"least {MIN_MIA} of each; hold out more images, or leave out --holdout"
            )


def _open_run(run_dir: Path) -> _Run:
    gen = load_generator(run_dir / "generator.pt")
    spec = gen.spec
    settings = run_settings(run_dir)
    classes = parse_classes(str(settings.get("classes", ""))) if spec.num_classes else ()
    if spec.num_classes and len(classes) != spec.num_classes:
        raise EvaluationError(
            f"{run_dir}: the generator has {spec.num_classes} classes but the run folder does "
            "not name them (run-config.json); evaluate it where it was run"
        )
    return _Run(run_dir, gen, settings, classes)


def _check_normal_class(
    normal_class: str | None, classes: tuple[str, ...], holdout: Path | None
) -> None:
    """Checked before minutes of work, not after."""
    if normal_class is None:
        return
    if normal_class not in classes:
        raise EvaluationError(
            f"--normal-class {normal_class!r} is not one of the run's classes "
            f"({', '.join(classes) or 'the run is not class-conditional'})"
        )
    if holdout is None:
        raise EvaluationError("the anomaly detector needs held-out images: pass --holdout")


def _read_images(
    run: _Run,
    real: Path,
    holdout: Path | None,
    kind: str,
    options: dict[str, str],
    effort: _Effort,
    say: Callable[[str], None],
) -> _Images:
    spec = run.gen.spec
    members, member_labels = _images(real, kind, spec, options, run.classes)
    say(f"real          {members.shape[0]} training images from {real}")
    held = held_labels = None
    if holdout is not None:
        held, held_labels = _images(holdout, kind, spec, options, run.classes)
        say(f"held out      {held.shape[0]} images from {holdout}")
    _check_enough(members, held)
    fake, fake_labels = generate(
        run.gen, effort.n_synthetic, seed=effort.seed, attributes=run.attributes
    )
    say(f"synthetic     {fake.shape[0]} images from {run.dir / 'generator.pt'}")
    return _Images(members, member_labels, held, held_labels, fake, fake_labels)


def _domain_encoder(
    path: Path, given: bool, members: torch.Tensor, effort: _Effort, say: Callable[[str], None]
) -> torch.nn.Module:
    """The site's encoder is reused when it exists, so that its domain-FIDs
    stay comparable between runs; otherwise trained on the members and kept."""
    if given and not path.exists():
        raise EvaluationError(f"--encoder {path} not found")
    if path.exists():
        enc = domain.load(path)
        say(f"encoder       {path} (reused: numbers stay comparable)")
    else:
        enc = domain.train_encoder(members, steps=effort.encoder_steps, seed=effort.seed)
        domain.save(enc, path)
        say(f"encoder       trained on the real images, saved to {path}")
    return enc


def _summary(run: _Run, site_id: str, images: _Images, enc_path: Path) -> dict[str, Any]:
    return {
        "site": site_id,
        "run": run.dir.name,
        "time": time.time(),
        "images": {
            "members": int(images.members.shape[0]),
            "held_out": 0 if images.held is None else int(images.held.shape[0]),
            "synthetic": int(images.fake.shape[0]),
        },
        "encoder": enc_path.name,
        # Which encoder: domain-FIDs compare only on the same one.
        "encoder_sha256": hashlib.sha256(enc_path.read_bytes()).hexdigest(),
    }


def _quality(
    run: _Run, images: _Images, enc: torch.nn.Module, say: Callable[[str], None]
) -> tuple[dict[str, Any], Discriminator | None]:
    """Quality on the domain encoder, and the run's D (None where it has
    none worth asking) for realism here and membership inference later."""
    real_all, fake = images.real, images.fake
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
    disc = _trained_discriminator(run)
    if disc is not None:
        quality["realism"] = float(
            torch.sigmoid(_disc_scores(disc, fake, images.fake_labels)).mean()
        )
    say(
        f"quality       domain-FID {fid:.2f}  KID×1000 {kid:.2f}  precision {precision:.2f}  "
        f"recall {recall:.2f}  SSIM {ssim:.3f}"
    )
    return quality, disc


def _trained_discriminator(run: _Run) -> Discriminator | None:
    """A mean-embedding run trains no D: its checkpoint's D is the untrained
    initial one, whose realism and membership scores would mean nothing."""
    ckpt_path = run.dir / "checkpoint.pt"
    if not ckpt_path.exists() or run.settings.get("mechanism", "dp-sgd") == "mean-embedding":
        return None
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    disc = Discriminator(run.gen.spec)
    disc.load_state_dict(ckpt["disc"])
    disc.eval()
    return disc


def _inception_weights(
    path: Path, sha: str, quality: dict[str, Any], say: Callable[[str], None]
) -> dict[str, Any]:
    """Which Inception weights: only the standard file's FIDs compare with
    published ones."""
    standard = inception.is_standard(sha)
    say(
        f"quality       Inception FID {quality['inception_fid']:.2f}"
        + (
            ""
            if standard
            else "  (weights are not pt_inception-2015-12-05-6726825d: not comparable "
            "with published FIDs)"
        )
    )
    return {"file": path.name, "sha256": sha, "standard": standard}


def _privacy(
    images: _Images, disc: Discriminator | None, say: Callable[[str], None]
) -> dict[str, Any]:
    """Memorization always; the membership-inference attacks only against
    images the site kept out of training."""
    members, held = images.members, images.held
    memorized, threshold, _ = metrics.memorization(images.fake, members, held)
    privacy: dict[str, Any] = {"memorized_fraction": memorized, "memorization_threshold": threshold}
    if held is not None and held.shape[0] >= 2:
        privacy["mia_generator_auc"] = metrics.mia_generator_auc(images.fake, members, held)
        if disc is not None:
            privacy["mia_discriminator_auc"] = metrics.auc(
                _disc_scores(disc, members, images.member_labels),
                _disc_scores(disc, held, images.held_labels),
            )
    else:
        privacy["mia"] = "not run: pass --holdout with images this site kept out of training"
    say(
        f"privacy       memorized {memorized:.1%}"
        + "".join(
            f"  {k.replace('_', ' ')} {v:.3f}" for k, v in privacy.items() if k.startswith("mia_")
        )
    )
    return privacy


def _utility(
    run: _Run, images: _Images, effort: _Effort, say: Callable[[str], None]
) -> dict[str, Any]:
    """TSTR against train-on-real on the held-out images, at the run's class
    cycle and at this site's own class mix (a second draw: its counts stay
    here)."""
    assert images.member_labels is not None
    at_mix = generate(
        run.gen,
        effort.n_synthetic,
        seed=effort.seed + 1,
        class_weights=torch.bincount(images.member_labels, minlength=len(run.classes)).tolist(),
        attributes=run.attributes,
    )
    assert at_mix[1] is not None
    utility = tstr(
        images.fake,
        images.fake_labels,
        images.members,
        images.member_labels,
        images.held,
        images.held_labels,
        len(run.classes),
        seed=effort.seed,
        seeds=effort.classifier_seeds,
        steps=effort.classifier_steps,
        at_mix=(at_mix[0], at_mix[1]),
    )
    say(_utility_line(utility, effort.classifier_seeds))
    return utility


def _utility_line(u: dict[str, Any], classifier_seeds: int) -> str:
    several = classifier_seeds > 1

    def figure(key: str) -> str:
        return f"{u[key]:.3f}" + (f" ± {u[key + '_sd']:.3f}" if several else "")

    return (
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


def _anomaly(
    run: _Run, images: _Images, normal_class: str, effort: _Effort, say: Callable[[str], None]
) -> dict[str, Any]:
    """The anomaly detector, trained on synthetic images of the normal class
    only, scores the held-out images; every other class counts as abnormal."""
    normal = run.classes.index(normal_class)
    fake_normal, _ = generate(run.gen, effort.n_synthetic, seed=effort.seed + 1, class_index=normal)
    anomaly = anomaly_auc(
        fake_normal,
        images.held,
        images.held_labels != normal,
        steps=effort.encoder_steps,
        seed=effort.seed,
    )
    say(
        f"anomaly       AUC {anomaly['anomaly_auc']:.3f} (normal: {normal_class}); "
        f"{anomaly['anomaly_detected']:.0%} of abnormal held-out images flagged"
    )
    return anomaly
