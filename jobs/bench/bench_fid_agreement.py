"""advflow's FID against torch-fidelity's FID Inception-v3 and torchmetrics' FID, on the same random weights.

torch-fidelity cannot be installed beside the CPU torch wheel (it requires torchvision, and its
package __init__ imports modules that import torchvision), so this check loads its Inception module
from an unpacked wheel without that __init__. It is a one-off measurement, not a test:

    pip download --no-deps torch-fidelity==0.4.0 -d /tmp/whl && unzip -o -q /tmp/whl/torch_fidelity-*.whl -d /tmp/whl/tf
    python jobs/bench/bench_fid_agreement.py --torch-fidelity-dir /tmp/whl/tf

Prints the largest feature difference between the two networks (same uint8 images, same weights) and
advflow's FID next to torchmetrics' FID computed on torch-fidelity's features.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import types

import numpy as np
import torch
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance  # before the stub below: it probes for torch_fidelity

from advflow.platform.eval.fid import FIDEvaluator, as_uint8_pixels
from advflow.platform.eval.inception import load_inception, random_inception


def random_weights(seed: int) -> dict[str, torch.Tensor]:
    return random_inception(seed).state_dict()


def images(n: int, seed: int, contrast: float, side: int = 32) -> torch.Tensor:
    """Smooth random colour images in [-1, 1] (N, 3, side, side)."""
    g = torch.Generator().manual_seed(seed)
    low = nn.functional.interpolate(torch.randn(n, 3, 4, 4, generator=g), size=(side, side), mode="bilinear")
    return torch.tanh(contrast * low + 0.3 * torch.randn(n, 3, side, side, generator=g))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--torch-fidelity-dir", required=True, help="folder holding the unpacked torch_fidelity package")
    p.add_argument("--num", type=int, default=24, help="images per side")
    a = p.parse_args(argv)
    pkg_dir = os.path.join(a.torch_fidelity_dir, "torch_fidelity")
    if not os.path.isfile(os.path.join(pkg_dir, "feature_extractor_inceptionv3.py")):
        p.error(f"--torch-fidelity-dir {a.torch_fidelity_dir}: no torch_fidelity/feature_extractor_inceptionv3.py; "
                "unpack the torch-fidelity wheel there (see the module docstring)")
    stub = types.ModuleType("torch_fidelity")
    stub.__path__ = [pkg_dir]  # submodules import from here; the package __init__ (torchvision) never runs
    sys.modules["torch_fidelity"] = stub
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    with tempfile.TemporaryDirectory() as tmp:
        weights = os.path.join(tmp, "inception-random.pth")
        torch.save(random_weights(3), weights)
        theirs_net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=weights)
        real, fake = as_uint8_pixels(images(a.num, 0, 1.0)), images(a.num, 1, 2.5)
        with torch.no_grad():
            diff = (load_inception(weights, "cpu").features(real) - theirs_net(real)[0]).abs().max()
        ref = os.path.join(tmp, "ref_batch.npz")
        np.savez(ref, arr_0=real.permute(0, 2, 3, 1).numpy())  # ADM's batch layout
        ours = FIDEvaluator(weights, ref, 8, device="cpu").evaluate(fake)["eval/fid"]

    class Features(nn.Module):
        num_features = 2048

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return theirs_net(x)[0].double()

    metric = FrechetInceptionDistance(feature=Features())
    metric.update(real, real=True)
    metric.update(as_uint8_pixels(fake), real=False)
    theirs = float(metric.compute())
    print(f"features: max |advflow - torch-fidelity| = {float(diff):.3g}")
    print(f"FID: advflow {ours:.6f}, torchmetrics on torch-fidelity's Inception {theirs:.6f}, "
          f"relative difference {abs(ours - theirs) / theirs:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
