"""The FID Inception-v3 network (TF "pt_inception-2015-12-05" graph, as ported to PyTorch for FID).

Module and parameter names follow that port's state dict (`Conv2d_1a_3x3.conv.weight`,
`Mixed_5b.branch1x1.bn.running_var`, ..., `fc.weight`), so a user's
`pt_inception-2015-12-05-*.pth` loads with strict key checking. It differs from the ImageNet
classification Inception-v3 in the average pools of the A, C and E_1 blocks (padding excluded from
the mean, as TF does) and in the last block, whose pool branch is a max-pool; the fc has 1008 classes.
Features are the 2048-d global average pool ("pool3"). No weights ship with advflow: pass a path.

Input is what the TF graph's `ExpandDims:0` takes, the tensor ADM's evaluator feeds: RGB pixel values
in [0, 255] (uint8 images cast to float). The graph then resizes to 299x299 with TF1's ResizeBilinear
(legacy coordinates: source = destination * in/out, no half-pixel offset, no antialias) and maps
[0, 255] to [-1, 1] as (x - 128) / 128; `features` does the same, so features match the network ADM's
suite runs (torch's bilinear `interpolate` samples at half-pixel centres: a different image).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

FEATURE_DIM = 2048
INPUT_SIZE = 299
NUM_LOGITS = 1008


class BasicConv2d(nn.Module):
    """conv (no bias) -> batch norm (eps 1e-3, TF's) -> ReLU."""

    def __init__(self, cin: int, cout: int, kernel_size, stride=1, padding=0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=1e-3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg3(x: torch.Tensor) -> torch.Tensor:
    # TF's 3x3/1 SAME average pool divides by the number of valid (non-padding) inputs.
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    """35x35 block: 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool-1x1 -> 224 + pool_features channels."""

    def __init__(self, cin: int, pool_features: int) -> None:
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, 1)
        self.branch5x5_1 = BasicConv2d(cin, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([
            self.branch1x1(x),
            self.branch5x5_2(self.branch5x5_1(x)),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            self.branch_pool(_avg3(x)),
        ], dim=1)


class InceptionB(nn.Module):
    """35 -> 17 reduction: 3x3/2 | 1x1-3x3-3x3/2 | maxpool/2 -> 384 + 96 + cin channels."""

    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([
            self.branch3x3(x),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            F.max_pool2d(x, 3, stride=2),
        ], dim=1)


class InceptionC(nn.Module):
    """17x17 block with factorised 7x7 convolutions (c7 inner channels) -> 768 channels."""

    def __init__(self, cin: int, channels_7x7: int) -> None:
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(cin, 192, 1)
        self.branch7x7_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = x
        for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                      self.branch7x7dbl_5):
            d = layer(d)
        return torch.cat([self.branch1x1(x), b7, d, self.branch_pool(_avg3(x))], dim=1)


class InceptionD(nn.Module):
    """17 -> 8 reduction: 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | maxpool/2 -> 320 + 192 + cin channels."""

    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, 3, stride=2)], dim=1)


class InceptionE(nn.Module):
    """8x8 block with split 1x3/3x1 heads -> 320 + 768 + 768 + 192 = 2048 channels.

    pool: "avg" (Mixed_7b, padding excluded from the mean) or "max" (Mixed_7c): the TF graph's
    last block max-pools in its pool branch."""

    def __init__(self, cin: int, pool: str) -> None:
        super().__init__()
        assert pool in ("avg", "max")
        self.pool = pool
        self.branch1x1 = BasicConv2d(cin, 320, 1)
        self.branch3x3_1 = BasicConv2d(cin, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], dim=1)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        d = torch.cat([self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d)], dim=1)
        pooled = _avg3(x) if self.pool == "avg" else F.max_pool2d(x, 3, stride=1, padding=1)
        return torch.cat([self.branch1x1(x), b3, d, self.branch_pool(pooled)], dim=1)


def _tf1_taps(n_in: int, n_out: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """TF1 legacy bilinear taps along one axis: source = destination * (n_in / n_out) in float32;
    the lower neighbour, the upper one (clamped to the edge) and the weight of the upper one."""
    scale = torch.tensor(n_in / n_out, dtype=torch.float32)
    src = torch.arange(n_out, dtype=torch.float32) * scale  # (n_out,)
    lo = src.floor().long().clamp(max=n_in - 1)
    hi = (lo + 1).clamp(max=n_in - 1)
    return lo.to(device), hi.to(device), (src - lo.float()).to(device)


def tf1_resize_bilinear(x: torch.Tensor, size: int) -> torch.Tensor:
    """(N, C, H, W) float -> (N, C, size, size) as TF1's ResizeBilinear (align_corners=False, no
    half-pixel centres): interpolate along the width first, then the height, each as lo + (hi - lo) * w."""
    n_h, n_w = x.shape[-2:]
    if (n_h, n_w) == (size, size):
        return x
    lo, hi, w = _tf1_taps(n_w, size, x.device)
    x = x[..., lo] + (x[..., hi] - x[..., lo]) * w  # (N, C, H, size)
    lo, hi, w = _tf1_taps(n_h, size, x.device)
    top, bottom = x[..., lo, :], x[..., hi, :]
    return top + (bottom - top) * w[:, None]  # (N, C, size, size)


class FIDInceptionV3(nn.Module):
    """(N, 3, H, W) pixel values in [0, 255], any H, W -> (N, 2048) pool3 features (or 1008 logits)."""

    def __init__(self) -> None:
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, pool="avg")
        self.Mixed_7c = InceptionE(2048, pool="max")
        self.fc = nn.Linear(FEATURE_DIM, NUM_LOGITS)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) pixel values in [0, 255] (uint8, or float holding uint8 values) -> (N, 2048)."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"Inception input must be RGB (N, 3, H, W), got {tuple(images.shape)}")
        x = tf1_resize_bilinear(images.float(), INPUT_SIZE)
        x = (x - 128.0) / 128.0  # the graph's Sub 128, Mul 1/128 (exact in float: 1/128 is a power of 2)
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))  # (N, 64, 147, 147)
        x = F.max_pool2d(x, 3, stride=2)  # (N, 64, 73, 73)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))  # (N, 192, 71, 71)
        x = F.max_pool2d(x, 3, stride=2)  # (N, 192, 35, 35)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c,
                      self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)  # ... (N, 2048, 8, 8)
        return x.mean(dim=(2, 3))  # (N, 2048)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(images))  # (N, 1008) logits


def _read_state_dict(path: str) -> dict[str, torch.Tensor]:
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    obj = torch.load(path, map_location="cpu", weights_only=True)  # never unpickles arbitrary objects
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: holds a {type(obj).__name__}, not a state dict")
    return obj


def load_inception(path: str, device: str | torch.device | None = None) -> FIDInceptionV3:
    """FIDInceptionV3 with the weights at `path` (.pth state dict or .safetensors), eval mode.

    Every key must match by name and shape (BatchNorm's num_batches_tracked may be absent: it does
    not affect inference)."""
    fix = ("pass the FID Inception weights 'pt_inception-2015-12-05-6726825d.pth' (the pytorch-fid port of "
           "TF's 2015-12-05 Inception graph), downloaded by you, as eval.inception_path")
    if not path or not os.path.isfile(path):
        raise FileNotFoundError(f"Inception weights {path!r}: no such file; {fix}")
    try:
        state = _read_state_dict(path)
    except Exception as exc:
        raise ValueError(f"Inception weights {path}: cannot be read as a tensor state dict "
                         f"({type(exc).__name__}: {exc}); {fix}") from exc
    model = FIDInceptionV3()
    expected = model.state_dict()
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    mis_shaped = [f"{k} {tuple(state[k].shape)} (expected {tuple(v.shape)})" for k, v in expected.items()
                  if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if missing or unexpected or mis_shaped:
        parts = [f"{label} ({len(keys)}): {', '.join(keys[:20])}{' ...' if len(keys) > 20 else ''}"
                 for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", mis_shaped))
                 if keys]
        raise ValueError(f"Inception weights {path}: not the FID Inception-v3 state dict; " + "; ".join(parts)
                         + f". Fix: {fix}")
    full = {k: state.get(k, expected[k]) for k in expected}  # absent counters keep their zero
    model.load_state_dict(full, strict=True)
    dev = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return model.to(dev).eval().requires_grad_(False)


def random_inception(seed: int = 0) -> FIDInceptionV3:
    """A seeded FIDInceptionV3 for tests and benchmarks (no real weights can be downloaded there):
    variance-preserving conv weights (PyTorch's default init shrinks activations ~1e-8 through 94
    layers) and non-trivial BN statistics, so features are O(1) and every tensor matters."""
    torch.manual_seed(seed)
    model = FIDInceptionV3()
    for mod in model.modules():
        if isinstance(mod, nn.Conv2d):
            nn.init.kaiming_normal_(mod.weight, nonlinearity="relu")
        elif isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.1, 0.1)
            mod.running_var.uniform_(0.8, 1.2)
    return model.eval()
