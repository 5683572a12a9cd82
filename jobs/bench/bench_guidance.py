"""Does classifier guidance help on digits? Evaluates the EMA generators of two runs that differ only
in the guided phase (steps 1000-1250 of jobs/configs/digits_guided.yaml), the way the platform does.

    python jobs/prepare_latents.py --source digits --encoder pixel --out /tmp/gm/digits
    python jobs/train.py --config jobs/configs/digits_classifier.yaml --no-ray \
        --set data.prefix=/tmp/gm/digits --set run.storage_path=/tmp/gm/runs --set tracking.enabled=false
    for run in guided plain: python jobs/train.py --config jobs/configs/digits_guided.yaml --no-ray \
        --set data.prefix=/tmp/gm/digits --set run.storage_path=/tmp/gm/runs --set run.name=$run \
        --set tracking.enabled=false --set guidance.classifier=/tmp/gm/runs/digits_classifier/checkpoint_000600
        (plain: --set 'phases=[{name: main, start: 0}, {name: guided, start: 1000}]')
    python jobs/bench/bench_guidance.py /tmp/gm/digits /tmp/gm/runs [RUN ...]   # default: guided plain

A third run isolates the augmentation: augment_only = the guided phase with augment_p 0.4 and no guidance
    (--set 'phases=[{name: main, start: 0}, {name: guided, start: 1000, augment_p: 0.4}]').
"""
import json
import sys

import torch
from pathlib import Path
from safetensors.torch import load_file
from advflow.platform.config import RunSpec
from advflow.platform.data.shards import read_manifest
from advflow.platform.eval import EVALUATORS
from advflow.platform.train.callbacks import Samples, EVAL_SEED
from advflow.trainers.models import build_generator

m = read_manifest(sys.argv[1])
shape, nc = tuple(m.shape), int(m.num_classes)
for run in sys.argv[3:] or ("guided", "plain"):
    for step in (1000, 1250):
        ck = Path(f"{sys.argv[2]}/{run}/checkpoint_{step:06d}")
        spec = RunSpec.from_dict(json.loads((ck / "trainer.json").read_text())["config"])
        ev = spec.eval
        G = build_generator(spec.model.size, in_channels=shape[0], input_size=shape[1], num_classes=nc,
                            kind=spec.model.kind, nfe=spec.model.nfe, repeats=spec.model.repeats)
        sd = load_file(str(ck / "ema.safetensors"))
        with torch.no_grad():
            for n, p in G.named_parameters():
                p.copy_(sd[n])
        G.eval()
        s = Samples(shape, nc, torch.device("cpu"), m.encoder)
        e = EVALUATORS[ev.kind].build(ev, encoder=m.encoder, data_shape=shape, num_classes=nc)
        labels = torch.arange(ev.num_samples) % nc
        out = e.evaluate(s.images(G, labels, torch.Generator().manual_seed(EVAL_SEED), ev.batch_size), labels)
        print(run, step, {k: round(float(v), 4) for k, v in dict(out).items()})
