"""The digits quality metric: a small classifier's feature space, and a held-out reference split.

scikit-learn's 8x8 digits (1797 images) are split once, deterministically and stratified by class
(`advflow.platform.data.digits.digits_split`), into a train split (the only digits the prepare job,
data/prepare.py, writes into shards) and a held-out split (the reference the generator never sees).
A small CNN is trained on the train split only; its penultimate layer (`feature_dim`-d, after ReLU)
is the feature space of the Fréchet distance, and its logits give the class accuracy of conditional
samples.

Why a floor: a perfect generator reproduces the train distribution, whose features are not exactly
the held-out ones (finite samples, and the classifier has seen the train images). `eval/fd_floor`
= FD(train split, held-out split) is what such a generator scores when it generates as many images
as the train split holds (`required_samples`); FD grows as the sample count shrinks.

The trained weights are cached as safetensors under $ADVFLOW_CACHE (default ~/.cache/advflow),
keyed by a hash of every training setting, so every trial of a sweep uses the same classifier.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from advflow.platform.atomic import write_bytes
from advflow.platform.data.digits import digits_pixels, digits_split, resize_digits
from advflow.platform.eval.coverage import K_NEIGHBOURS, knn_radii, precision_recall, within_class_diversity
from advflow.platform.eval.frechet import FrechetReference, feature_stats

NUM_CLASSES = 10
SIDE = 8
_FORMAT = 1  # bump when the network or the training procedure changes: invalidates cached weights


# -- classifier ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DigitsEvalConfig:
    """Everything that determines the classifier's weights (its hash keys the weight cache).

    split_seed / holdout_fraction: the digits split (must match the dataset's manifest `holdout`).
    seed: weight init, batch order and augmentation. epochs / batch_size / lr / weight_decay: AdamW
        training on the train split. width: channels of the first conv. feature_dim: size of the
        penultimate layer = the Fréchet feature space (small, so 359 held-out images estimate its
        covariance well). shift: random translation by up to `shift` pixels (augmentation, so
        features do not hinge on exact pixel placement).
    """

    split_seed: int = 0
    holdout_fraction: float = 0.2
    seed: int = 0
    epochs: int = 30
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 1e-4
    width: int = 16
    feature_dim: int = 64
    shift: int = 1

    def key(self) -> str:
        blob = json.dumps({**asdict(self), "format": _FORMAT}, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


class DigitNet(nn.Module):
    """(N, 1, 8, 8) in [-1, 1] -> logits (N, 10); `features` is the penultimate layer (N, feature_dim)."""

    def __init__(self, width: int = 32, feature_dim: int = 64) -> None:
        super().__init__()
        w = width
        self.body = nn.Sequential(
            nn.Conv2d(1, w, 3, padding=1), nn.ReLU(),  # (N, w, 8, 8)
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),  # (N, 2w, 4, 4)
            nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.ReLU(),
            nn.Flatten(),  # (N, 2w * 16)
            nn.Linear(2 * w * 16, feature_dim), nn.ReLU(),
        )
        self.head = nn.Linear(feature_dim, NUM_CLASSES)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def _shift(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """Translate (N, 1, H, W) by (dy, dx) pixels, filling with background (-1)."""
    if dy == 0 and dx == 0:
        return x
    s = max(abs(dy), abs(dx))
    h, w = x.shape[-2:]
    padded = F.pad(x, (s, s, s, s), value=-1.0)
    return padded[..., s - dy:s - dy + h, s - dx:s - dx + w]


def train_classifier(cfg: DigitsEvalConfig) -> DigitNet:
    """Train on the train split only; deterministic for a given config (CPU, fixed seeds). Runs inside
    a forked RNG so a training process that builds an evaluator keeps its own random stream."""
    train_idx, _ = digits_split(cfg.split_seed, cfg.holdout_fraction)
    x, y = digits_pixels(train_idx)  # (N, 1, 8, 8), (N,)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        net = DigitNet(cfg.width, cfg.feature_dim)
        gen = torch.Generator().manual_seed(cfg.seed)
        opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        steps_per_epoch = -(-len(x) // cfg.batch_size)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.epochs * steps_per_epoch)
        net.train()
        for _ in range(cfg.epochs):
            order = torch.randperm(len(x), generator=gen)
            for a in range(0, len(x), cfg.batch_size):
                b = order[a:a + cfg.batch_size]
                dy, dx = (torch.randint(-cfg.shift, cfg.shift + 1, (2,), generator=gen).tolist()
                          if cfg.shift else (0, 0))
                loss = F.cross_entropy(net(_shift(x[b], dy, dx)), y[b])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
    return net.eval().requires_grad_(False)


def cache_dir(override: str | None = None) -> str:
    return override or os.environ.get("ADVFLOW_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "advflow")


def load_or_train_classifier(cfg: DigitsEvalConfig, cache: str | None = None) -> DigitNet:
    """The classifier for `cfg`, from the safetensors cache or trained now (and cached atomically)."""
    from safetensors.torch import load_file, save

    folder = cache_dir(cache)
    path = os.path.join(folder, f"digits_classifier-{cfg.key()}.safetensors")
    if os.path.isfile(path):
        net = DigitNet(cfg.width, cfg.feature_dim)
        try:
            net.load_state_dict(load_file(path), strict=True)
            return net.eval().requires_grad_(False)
        except Exception as exc:
            warnings.warn(f"{path}: unreadable cached digits classifier ({exc}); retraining", stacklevel=2)
    net = train_classifier(cfg)
    state = {k: v.contiguous() for k, v in net.state_dict().items()}
    meta = {"config": json.dumps(asdict(cfg), sort_keys=True), "format": str(_FORMAT)}
    write_bytes(path, save(state, metadata=meta))  # concurrent trials may race here: both write identical bytes
    return net


# -- evaluator ------------------------------------------------------------------------------------------
def to_digit_pixels(images: torch.Tensor) -> torch.Tensor:
    """Generated images (N, C, H, W) in [-1, 1], C in {1, 3}, any size -> (N, 1, 8, 8) float32."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must be (N, 1 or 3, H, W) pixels, got shape {tuple(images.shape)}")
    x = images.detach().float().cpu()
    if x.shape[1] == 3:  # RGB (e.g. digits through the SD-VAE): grey = channel mean
        x = x.mean(dim=1, keepdim=True)
    h, w = x.shape[-2:]
    if (h, w) != (SIDE, SIDE):
        # Area averaging when shrinking (anti-aliased); bilinear when growing.
        mode = "area" if h >= SIDE and w >= SIDE else "bilinear"
        x = F.interpolate(x, size=(SIDE, SIDE), mode=mode, **({} if mode == "area" else {"align_corners": False}))
    return x.clamp(-1.0, 1.0)


class DigitsEvaluator:
    """Fréchet distance and conditional accuracy of generated digits (see module doc).

    evaluate() returns eval/fd (primary), eval/fd_floor, eval/cls_acc, eval/classifier_heldout_acc,
    eval/num_samples, and the mode coverage (`eval/coverage.py`) in the same feature space against the
    same held-out digits: eval/precision and eval/recall (k = `pr_k` nearest neighbours; when there are
    more than k images) and eval/diversity / eval/diversity_min (within-class spread of the generated
    features over the held-out digits' spread, per class the images are labelled with; when a class
    has at least 2 images). required_samples: the train split size, the N at which eval/fd is
    comparable to eval/fd_floor. Split for evaluation on many ranks: `features` per rank,
    `metrics_from_features` on one rank over every rank's rows (`evaluate` is both).
    """

    primary = "eval/fd"

    def __init__(self, config: DigitsEvalConfig | None = None, *, data_side: int = SIDE, device: str = "cpu",
                 cache_dir: str | None = None, batch_size: int = 2048, pr_k: int = K_NEIGHBOURS) -> None:
        self.config = config or DigitsEvalConfig()
        # Data prepared at another resolution: the reference digits make the same round trip
        # (prepare's upsampling, then to_digit_pixels) as a perfect generator's samples would.
        self.data_side = int(data_side)
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.net = load_or_train_classifier(self.config, cache_dir).to(self.device)
        train_idx, held_idx = digits_split(self.config.split_seed, self.config.holdout_fraction)
        self.required_samples = len(train_idx)
        train_f, _ = self._run(self._reference(digits_pixels(train_idx)[0]))
        held_x, held_y = digits_pixels(held_idx)
        held_f, held_logits = self._run(self._reference(held_x))
        self.ref_mu, self.ref_sigma = feature_stats(held_f)
        self.reference = FrechetReference(self.ref_mu, self.ref_sigma, "held-out digits")
        self.fd_floor = self.reference.distance(*feature_stats(train_f), "train-split digits")
        self.heldout_acc = float((held_logits.argmax(1) == held_y.numpy()).mean())
        # The reference of precision/recall and diversity: the held-out digits' features and classes.
        self.pr_k = int(pr_k)
        self.held_features, self.held_labels = held_f, held_y.numpy()
        self.held_radii = knn_radii(held_f, self.pr_k, dtype=torch.float64)

    def _reference(self, x: torch.Tensor) -> torch.Tensor:
        return to_digit_pixels(resize_digits(x, self.data_side))

    @torch.no_grad()
    def _run(self, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """(N, 1, 8, 8) -> (features (N, D), logits (N, 10)) as float64 numpy."""
        feats, logits = [], []
        for a in range(0, len(x), self.batch_size):
            f = self.net.features(x[a:a + self.batch_size].to(self.device))
            feats.append(f.double().cpu())
            logits.append(self.net.head(f).double().cpu())
        return torch.cat(feats).numpy(), torch.cat(logits).numpy()

    def features(self, images: torch.Tensor) -> np.ndarray:
        """Generated images (N, C, H, W) in [-1, 1] -> (N, feature_dim + 10) float64: the Fréchet
        features, then the classifier's logits (what `metrics_from_features` reads)."""
        if images.ndim == 4 and images.shape[0]:
            bad = int((~torch.isfinite(images.detach())).flatten(1).any(1).sum())
            if bad:
                raise ValueError(f"{bad} of {len(images)} generated images contain NaN/Inf: the generator diverged")
        feats, logits = self._run(to_digit_pixels(images))
        return np.concatenate([feats, logits], axis=1)

    def metrics_from_features(self, features: np.ndarray, labels: torch.Tensor) -> dict[str, float]:
        """Every generated image's `features` rows (N, feature_dim + 10), with the (N,) labels they were
        conditioned on -> eval/fd, eval/fd_floor, eval/cls_acc, eval/classifier_heldout_acc, eval/num_samples,
        eval/precision, eval/recall (more than `pr_k` images), eval/diversity, eval/diversity_min (a
        class with at least 2 images)."""
        rows = np.asarray(features, dtype=np.float64)
        width = self.config.feature_dim + NUM_CLASSES
        assert rows.ndim == 2 and rows.shape[1] == width, f"features rows must be (N, {width}), got {rows.shape}"
        y = torch.as_tensor(labels).detach().cpu().long().reshape(-1)
        if len(y) != len(rows):
            raise ValueError(f"{len(rows)} images but {len(y)} labels: pass the label each image was generated with")
        if len(rows) < 2:
            raise ValueError(f"need at least 2 images for a Fréchet distance, got {len(rows)} "
                             f"(recommended: {self.required_samples})")
        if y.numel() and (y.min() < 0 or y.max() >= NUM_CLASSES):
            raise ValueError(f"labels must be digit classes in [0, {NUM_CLASSES}), got range "
                             f"[{int(y.min())}, {int(y.max())}]")
        feats, logits = rows[:, :self.config.feature_dim], rows[:, self.config.feature_dim:]
        out = {
            "eval/fd": self.reference.distance_to_features(feats, "generated images"),
            "eval/fd_floor": self.fd_floor,
            "eval/cls_acc": float((logits.argmax(1) == y.numpy()).mean()),
            "eval/classifier_heldout_acc": self.heldout_acc,
            "eval/num_samples": float(len(rows)),
        }
        if len(feats) > self.pr_k:
            out["eval/precision"], out["eval/recall"] = precision_recall(
                self.held_features, feats, self.pr_k, real_radii=self.held_radii, dtype=torch.float64)
        div = within_class_diversity(self.held_features, self.held_labels, feats, y.numpy())
        if div["classes"]:
            out["eval/diversity"], out["eval/diversity_min"] = div["diversity"], div["diversity_min"]
        return out

    def evaluate(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        """`metrics_from_features(features(images), labels)`: the whole evaluation in one process."""
        y = torch.as_tensor(labels).detach().cpu().long().reshape(-1)
        if images.ndim == 4 and len(y) != len(images):  # before the network runs: the cheaper error first
            raise ValueError(f"{len(images)} images but {len(y)} labels: pass the label each image was generated with")
        return self.metrics_from_features(self.features(images), y)
