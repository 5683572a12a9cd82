"""trainers/draws.py: per-sample randomness that does not depend on how a batch is split.

The claims: (1) a single worker's BatchSlice draws exactly what a plain generator draws; (2) the
workers' slices, put together, are the single worker's draw; (3) hence D's and G's losses and
gradients on a global batch split over two workers average to those of the whole batch in one
call, with augmentation, R1/R2 (a subset of the batch) and anystep times all drawn."""

from __future__ import annotations

import pytest
import torch

from advflow.trainers import afm, draws
from advflow.trainers.models import build_discriminator, build_generator


def _slices(seed: int, total: int, parts: int) -> list[draws.BatchSlice]:
    rows = total // parts
    return [draws.BatchSlice(torch.Generator().manual_seed(seed), start=r * rows, rows=rows, total=total)
            for r in range(parts)]


@pytest.mark.parametrize("fn,args", [
    (draws.randn, ((8, 3, 2),)), (draws.rand, ((8, 5),)), (draws.randint, (0, 7, (8,)))])
def test_one_worker_draws_what_a_plain_generator_draws(fn, args):
    (whole,) = _slices(3, 8, 1)
    plain = fn(*args, torch.Generator().manual_seed(3))
    torch.testing.assert_close(fn(*args, whole), plain, rtol=0, atol=0)


@pytest.mark.parametrize("parts", [2, 4])
def test_slices_put_together_are_the_whole_draw(parts):
    rows = 8 // parts
    for shape, batch_dim in (((8, 3), 0), ((2, 8), 1)):
        want = draws.rand(shape, _slices(5, 8, 1)[0], batch_dim=batch_dim)
        local = list(shape)
        local[batch_dim] = rows
        got = torch.cat([draws.rand(tuple(local), s, batch_dim=batch_dim) for s in _slices(5, 8, parts)], batch_dim)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    # a subset draw (2 of each worker's rows) is the matching part of the whole subset draw
    want = draws.randn((2 * parts, 4), _slices(5, 8, 1)[0])
    got = torch.cat([draws.randn((2, 4), s) for s in _slices(5, 8, parts)])
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_a_subset_that_cannot_be_placed_in_the_global_draw_is_refused():
    # rows 3..4 of 8 (an uneven split): 1 of its 2 rows would start half-way through a global row
    uneven = draws.BatchSlice(torch.Generator().manual_seed(5), start=3, rows=2, total=8)
    with pytest.raises(ValueError, match="not the same fraction of every worker's rows"):
        draws.randn((1, 4), uneven)


def test_gp_indices_of_the_halves_are_the_whole_batchs():
    n, m = 16, afm.gp_size(0.25, 16)
    whole = afm.gp_indices(n, m).tolist()
    halves = [i + r * n // 2 for r in range(2) for i in afm.gp_indices(n // 2, afm.gp_size(0.25, n // 2)).tolist()]
    assert halves == whole == [0, 4, 8, 12]


def _nets():
    torch.manual_seed(0)
    G = build_generator("tiny", kind="anystep", in_channels=1, input_size=8, num_classes=10)
    D = build_discriminator("tiny", time_cond=True, in_channels=1, input_size=8, num_classes=10)
    with torch.no_grad():  # DiT zero-initialises its output layer: move off it so G uses its inputs
        for p in list(G.parameters()) + list(D.parameters()):
            p.add_(0.02 * torch.randn_like(p))
    return G, D


@pytest.mark.parametrize("which", ["d", "g"])
def test_two_workers_losses_and_gradients_average_to_the_whole_batch(which):
    G, D = _nets()
    cfg = afm.AFMConfig(augment_p=0.5, lambda_gp=1.0, gp_fraction=0.25, use_gradnorm=False, lambda_ot=0.1)
    n = 16
    x = torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    y = torch.arange(n) % 10
    net = D if which == "d" else G

    def run(sl: draws.BatchSlice, lo: int, hi: int):
        net.zero_grad(set_to_none=True)
        z = draws.randn((hi - lo, 1, 8, 8), sl)
        if which == "d":
            loss, _ = afm.d_loss(G, D, x[lo:hi], y[lo:hi], z, cfg, generator=sl)
        else:
            loss, _ = afm.g_loss(G, D, None, x[lo:hi], y[lo:hi], z, cfg, generator=sl)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in net.parameters() if p.grad is not None]

    whole_loss, whole_grads = run(_slices(9, n, 1)[0], 0, n)
    halves = [run(s, r * n // 2, (r + 1) * n // 2) for r, s in enumerate(_slices(9, n, 2))]
    torch.testing.assert_close((halves[0][0] + halves[1][0]) / 2, whole_loss, rtol=1e-5, atol=1e-6)
    for a, b, w in zip(halves[0][1], halves[1][1], whole_grads):
        torch.testing.assert_close((a + b) / 2, w, rtol=1e-4, atol=1e-6)
    # Not vacuous: drawing per worker (the old rank-seeded way) changes the numbers.
    alone = [draws.BatchSlice(torch.Generator().manual_seed(9), 0, n // 2, n // 2) for _ in range(2)]
    other = [run(s, r * n // 2, (r + 1) * n // 2)[0] for r, s in enumerate(alone)]
    assert not torch.allclose((other[0] + other[1]) / 2, whole_loss, rtol=1e-3)
