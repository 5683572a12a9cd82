"""Evaluation on every rank (issue 14, item 3): each rank samples and featurises its share of the
fixed-seed eval samples, rank 0 gathers the rows and computes the metric.

The digits metric of a real (tiny, random) generator evaluated by two gloo processes must equal the
same evaluation in one process, also when the shares are unequal or one rank has none; a rank that
fails must make every rank fail instead of leaving the others waiting in the collective."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import traceback
from pathlib import Path

import numpy as np
import pytest
import torch

from advflow.platform.config import RunSpec
from advflow.platform.eval import COVERAGE_KEYS
from advflow.platform.train import callbacks as cb
from advflow.platform.train.cadence import Cadence
from advflow.platform.train.gather import block_range
from advflow.trainers.models import build_generator

ENCODER = {"name": "pixel", "scaling_factor": 1.0, "holdout": {"seed": 0, "fraction": 0.2}}
# 50 samples in blocks of 8: 7 blocks (the last holds 2), shared 3 / 4 by two ranks (24 / 26 samples);
# 5 samples: one block, which rank 1 holds while rank 0 has none.
CASES = {"unequal": (50, 8), "one_block": (5, 8)}


class Logger:
    def __init__(self):
        self.logged = []

    def log_metrics(self, metrics, step):
        self.logged.append((step, dict(metrics)))


def evaluate(rank: int, world: int, num_samples: int, batch_size: int, tmp: str, fail_rank: int = -1) -> dict:
    """One rank's evaluation of the seeded tiny generator at step 10; rank 0 returns the metrics."""
    spec = RunSpec.from_dict({"data": {"prefix": "/x"}, "train": {"steps": 10, "checkpoint_every": 10},
                              "eval": {"kind": "digits", "every": 10, "num_samples": num_samples,
                                       "batch_size": batch_size}})
    torch.manual_seed(0)
    g = build_generator("tiny", kind="1nfe", in_channels=1, input_size=8, num_classes=10).eval()
    with torch.no_grad():  # DiT's zero-initialised output layer maps every noise to the same image
        for p in g.parameters():
            p.add_(0.05 * torch.randn_like(p))
    samples = cb.Samples((1, 8, 8), 10, torch.device("cpu"), ENCODER)
    logger = Logger()
    ev = cb.Evaluation(samples, spec.eval, logger, Cadence(10, 10), rank=rank, world_size=world)
    from advflow.platform.eval import EVALUATORS

    ev._evaluator = EVALUATORS["digits"].build(spec.eval, encoder=ENCODER, data_shape=(1, 8, 8), num_classes=10)
    featurised = []
    real_features = ev._evaluator.features

    def features(images):
        if rank == fail_rank:
            raise ValueError(f"rank {rank}: injected failure")
        featurised.append(len(images))
        return real_features(images)

    ev._evaluator.features = features
    m = cb.Moment.at(10, True, lambda: g, since=0, checkpoint_dir=Path(tmp))
    ev(m)
    return {"metrics": m.metrics, "featurised": sum(featurised), "logged": logger.logged}


def _rank_main(rank: int, world: int, port: int, cache: str, out: str, cases: dict, fail_rank: int) -> None:
    """A spawned rank: its results (or its error) as JSON in `out`/rank{r}.json."""
    os.environ["ADVFLOW_CACHE"] = cache
    result: dict = {}
    try:
        torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                             world_size=world)
        for name, (n, b) in cases.items():
            result[name] = evaluate(rank, world, n, b, out, fail_rank)
    except Exception as exc:
        result["error"] = f"{type(exc).__name__}: {exc}"
        result["trace"] = traceback.format_exc()
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))


def run_ranks(world: int, cache: str, out: Path, cases: dict, fail_rank: int = -1) -> list[dict]:
    from advflow.infra.local.proc import free_port

    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, world, port, cache, str(out), cases, fail_rank))
             for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    alive = [p.pid for p in procs if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
    assert not alive, f"ranks {alive} still running after 300 s: a collective waited for a rank that failed"
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("advflow-cache"))


def test_block_range_covers_every_block_once_in_order():
    for n, b in [(50, 8), (5, 8), (64, 8), (1, 1), (17, 4)]:
        blocks = -(-n // b)
        for world in (1, 2, 3, 5, 9):
            shares = [block_range(n, b, r, world) for r in range(world)]
            assert [k for s in shares for k in s] == list(range(blocks))
            assert max(map(len, shares)) - min(map(len, shares)) <= 1


@pytest.mark.integration
def test_two_ranks_give_the_one_rank_metric(cache, tmp_path, monkeypatch):
    monkeypatch.setenv("ADVFLOW_CACHE", cache)  # the classifier is trained here once; the ranks load it
    single = {name: evaluate(0, 1, n, b, str(tmp_path)) for name, (n, b) in CASES.items()}
    ranks = run_ranks(2, cache, tmp_path, CASES)
    for r in ranks:
        assert "error" not in r, r.get("trace")
    for name, (n, b) in CASES.items():
        one, two = single[name]["metrics"], ranks[0][name]["metrics"]
        assert one["eval/num_samples"] == two["eval/num_samples"] == n
        assert set(two) == set(one)
        for key in ("eval/fd", "eval/cls_acc", "eval/fd_floor", *(k for k in COVERAGE_KEYS if k in one)):
            assert two[key] == pytest.approx(one[key], rel=1e-6, abs=1e-12), (name, key)
        # the mode coverage: precision/recall from more than 3 samples, diversity from 2 of a class
        assert {"eval/precision", "eval/recall"} <= set(one)
        assert ("eval/diversity" in one) == (name == "unequal")
        assert one["eval/fd"] > 0 and np.isfinite(one["eval/fd"])
        print(f"{name}: eval/fd 1 rank {one['eval/fd']!r}, 2 ranks {two['eval/fd']!r}")
        # Each rank featurised exactly its own share; only rank 0 has (and logs) metrics.
        shares = [sum(min(n, (k + 1) * b) - k * b for k in block_range(n, b, r, 2)) for r in range(2)]
        assert [rk[name]["featurised"] for rk in ranks] == shares and sum(shares) == n
        assert ranks[1][name]["metrics"] == {} and ranks[1][name]["logged"] == []
        assert [s for s, _ in ranks[0][name]["logged"]] == [10]
    assert [rk["unequal"]["featurised"] for rk in ranks] == [24, 26]
    assert [rk["one_block"]["featurised"] for rk in ranks] == [0, 5]


@pytest.mark.integration
def test_a_failing_rank_fails_every_rank(cache, tmp_path, monkeypatch):
    monkeypatch.setenv("ADVFLOW_CACHE", cache)
    evaluate(0, 1, 4, 2, str(tmp_path))  # the classifier into the cache before the ranks start
    ranks = run_ranks(2, cache, tmp_path, {"unequal": (16, 4)}, fail_rank=1)
    assert "rank 1: injected failure" in ranks[1]["error"]
    assert "RankFailed" in ranks[0]["error"] and "rank(s) [1]" in ranks[0]["error"]
