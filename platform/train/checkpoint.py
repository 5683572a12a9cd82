"""Training checkpoints: both DeepSpeed engines, EMA(G), gradient-normalisation state, reader
states, step, phase and the per-step metric history.

Layout of one checkpoint directory (each rank writes its part into its own staging directory; Ray
Train merges the ranks' directories into one under `storage_path` and registers the checkpoint only
after every rank has uploaded, so a checkpoint becomes visible only when complete):

    g/ds/...                DeepSpeed engine of G (model states from rank 0, one ZeRO shard per rank)
    d/ds/...                the same for D
    ema.safetensors         EMA(G) weights                      (rank 0)
    gradnorm.safetensors    GradNormalizer buffers              (rank 0)
    dtag-<tag>.safetensors  D snapshots taken at phase ends     (rank 0; for Table 11's D reload)
    reader-rank{r}.json     data-stream states of rank r        (every rank)
    trainer.json            step, world size, history, version  (rank 0, written last)

Our own files are written with safetensors/JSON (no pickle); DeepSpeed's engine files are its own
format and are only ever read back from our own storage.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from safetensors.torch import load_file, save_file

from advflow.platform.atomic import write_text

if TYPE_CHECKING:
    from advflow.platform.train.worker import AFMTrainer

FORMAT_VERSION = 1
DS_TAG = "ds"


class CheckpointError(RuntimeError):
    """A checkpoint is incomplete or belongs to another run layout."""


@contextlib.contextmanager
def staging_dir() -> Iterator[str]:
    with tempfile.TemporaryDirectory(prefix="advflow-ckpt-") as tmp:
        yield tmp


def _write_json(path: Path, obj) -> None:
    write_text(path, json.dumps(obj, indent=1, sort_keys=True))


def save(directory: str, trainer: "AFMTrainer", step: int) -> None:
    """Collective: every rank calls it with its own staging directory."""
    root = Path(directory)
    trainer.g_engine.save_checkpoint(str(root / "g"), tag=DS_TAG)
    trainer.d_engine.save_checkpoint(str(root / "d"), tag=DS_TAG)
    rank = trainer.ctx.rank
    readers = {name: s.state_dict() for name, s in trainer.streams.items()}
    _write_json(root / f"reader-rank{rank}.json", readers)
    if rank == 0:
        save_file({k: v.contiguous() for k, v in trainer.ema.state_dict()["shadow"].items()},
                  str(root / "ema.safetensors"))
        save_file({k: v.contiguous() for k, v in trainer.gradnorm.state_dict().items()},
                  str(root / "gradnorm.safetensors"))
        for tag, weights in trainer.d_tags.items():
            save_file({k: v.contiguous() for k, v in weights.items()}, str(root / f"dtag-{tag}.safetensors"))
        ema = trainer.ema.state_dict()
        _write_json(root / "trainer.json", {
            "format": FORMAT_VERSION,
            "step": step,
            "world_size": trainer.ctx.world_size,
            "ema": {k: ema[k] for k in ("decay", "warmup", "num_updates")},
            "history": trainer.state.history,
            "resumes": trainer.state.resumes,
            "config": trainer.spec.to_dict(),
        })


def read_meta(directory: str) -> dict:
    path = Path(directory) / "trainer.json"
    if not path.is_file():
        raise CheckpointError(f"{directory}: no trainer.json; this is not a complete advflow checkpoint")
    meta = json.loads(path.read_text())
    if meta.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: format {meta.get('format')} is not {FORMAT_VERSION}; "
                              "resume it with the advflow version that wrote it")
    return meta


def load(directory: str, trainer: "AFMTrainer") -> None:
    """Restore every piece of state into an already-built trainer (all ranks)."""
    root = Path(directory)
    meta = read_meta(directory)
    world = trainer.ctx.world_size
    if meta["world_size"] != world:
        raise CheckpointError(
            f"{directory}: written by {meta['world_size']} workers, resuming with {world}; ZeRO shards are "
            f"per worker, so set distributed.workers={meta['world_size']} to resume this run")
    missing = [f"reader-rank{r}.json" for r in range(world) if not (root / f"reader-rank{r}.json").is_file()]
    if missing:
        raise CheckpointError(f"{directory}: incomplete checkpoint, missing {missing}")
    for name, engine in (("g", trainer.g_engine), ("d", trainer.d_engine)):
        path, _ = engine.load_checkpoint(str(root / name), tag=DS_TAG, load_optimizer_states=True,
                                         load_lr_scheduler_states=False)
        if path is None:
            raise CheckpointError(f"{directory}/{name}: DeepSpeed found no checkpoint under tag {DS_TAG!r}")
    ema_state = {**meta["ema"], "shadow": load_file(str(root / "ema.safetensors"))}
    trainer.ema.load_state_dict(ema_state)
    trainer.gradnorm.load_state_dict(load_file(str(root / "gradnorm.safetensors")))
    trainer.d_tags = {p.name[len("dtag-"):-len(".safetensors")]: load_file(str(p))
                      for p in root.glob("dtag-*.safetensors")}
    readers = json.loads((root / f"reader-rank{trainer.ctx.rank}.json").read_text())
    for name, stream in trainer.streams.items():
        stream.load_state_dict(readers[name])
    trainer.iters = {k: iter(s) for k, s in trainer.streams.items()}
    trainer.state.step = int(meta["step"])
    trainer.state.history = list(meta["history"])
    trainer.state.resumes = list(meta.get("resumes", [])) + [trainer.state.step]
