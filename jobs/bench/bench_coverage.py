"""The cost of improved precision/recall (platform/eval/coverage.py) at Inception's 2048-d.

Random Gaussian features stand in for real and generated ones (the cost does not depend on their
values). Times the real set's k-NN radii (an evaluator computes them once per reference) and one
evaluation given them (the generated set's radii and the one pass over generated x real distances),
and reports the process's peak resident memory: the blocks of distances, never an N x N matrix.

    python jobs/bench/bench_coverage.py --real 10000 --fake 10000 [--dim 2048] [--dtype float32] [--device cpu]
"""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np
import torch

from advflow.platform.eval.coverage import K_NEIGHBOURS, knn_radii, precision_recall


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--real", type=int, default=10_000)
    p.add_argument("--fake", type=int, default=10_000)
    p.add_argument("--dim", type=int, default=2048)
    p.add_argument("--k", type=int, default=K_NEIGHBOURS)
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--chunk", type=int, default=None, help="rows per block (default: about 2^25 distances)")
    a = p.parse_args(argv)
    dtype = getattr(torch, a.dtype)
    rng = np.random.default_rng(0)
    real = torch.as_tensor(rng.standard_normal((a.real, a.dim), dtype=np.float32), device=a.device)
    fake = torch.as_tensor(1.05 * rng.standard_normal((a.fake, a.dim), dtype=np.float32) + 0.02, device=a.device)

    def timed(fn):
        if a.device.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        out = fn()
        if a.device.startswith("cuda"):
            torch.cuda.synchronize()
        return out, time.perf_counter() - t

    radii, t_radii = timed(lambda: knn_radii(real, a.k, chunk=a.chunk, dtype=dtype))
    (prec, rec), t_pr = timed(lambda: precision_recall(real, fake, a.k, chunk=a.chunk, real_radii=radii, dtype=dtype))
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"real {a.real} x {a.dim}, generated {a.fake}, k={a.k}, {a.dtype} on {a.device} "
          f"({torch.get_num_threads()} threads): real radii {t_radii:.1f} s (once per reference); "
          f"precision/recall given them {t_pr:.1f} s; total {t_radii + t_pr:.1f} s; precision {prec:.4f} "
          f"recall {rec:.4f}; peak RSS {peak_mb:.0f} MB")


if __name__ == "__main__":
    main()
