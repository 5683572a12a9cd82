"""Register an externally trained generator checkpoint as a new model version.

  python jobs/register_checkpoint.py --checkpoint afm_xl2_1nfe.pt --name afm-xl2 \
      --decoder sd-vae --vae-path /models/sd-vae-ft-ema
  python jobs/register_checkpoint.py --checkpoint g.safetensors --name digits --kind multistep --nfe 4
  python jobs/register_checkpoint.py --checkpoint afm_xl2_deep.pt --name afm-xl2-112 --repeats 4 ...

The file (.safetensors, or .pt/.pth/.ckpt/.bin read with torch.load(weights_only=True) only; the
official DiT-layout AFM releases included) is read by advflow.trainers.dit_checkpoint, which infers
size, kind and classes from the tensors; --kind/--nfe/--repeats/--key resolve what the weights do not
record. Weights with a t_embedder and no t_tgt_embedder fit both a multistep generator and a
depth-repeated 1NFE generator (the paper's 56/112-layer models) and are refused unless
--kind multistep --nfe K or --repeats R says which, or the kind is recorded beside the file
(safetensors metadata advflow.kind / advflow.nfe / advflow.repeats, or a <file stem>.json /
generator.json sidecar; see advflow.trainers.dit_checkpoint). A multistep generator needs --nfe K
unless K is recorded. A run in --experiment (default "imports") records the source path and sha256 (tags
source_path, source_sha256, also set on the version); the generator is logged with
registry.log_generator(source="import"). Only the safetensors export is uploaded, never the file.

--layout cafm-sit imports an official SiT / CAFM-SiT generator (ByteDance-Seed/Adversarial-Flow-Models:
a CAFM run's states/<step>/models/ema.pth or gen.pth, or the released / pretrained SiT-XL-2-256.pt; plain
state dicts) through advflow.trainers.dit_checkpoint.build_from_cafm_sit: a multistep velocity model
whose velocity(x_t, y, t) is CAFM's Generator(x_t, y, t) = -SiT(x_t, 1 - t, y) (learn_sigma's extra
channels dropped, the 1001-row class table kept as 1000 classes plus the null row). It needs --nfe K
(the Euler steps it samples with; not in the weights). It is tagged method=fm, so it can be
model.init of a method cafm run (which takes only flow-matching velocity models) and is the output of
one as well; the version description says which layout it came from.

  python jobs/register_checkpoint.py --layout cafm-sit --checkpoint SiT-XL-2-256.pt --name sit-xl2 \
      --nfe 8 --decoder sd-vae --vae-path /models/sd-vae-ft-ema
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys

from advflow.platform.data.encoders import SD_VAE_SCALE


def sha256_file(path: str, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def decoder_dict(decoder: str, vae_path: str | None) -> dict:
    """The manifest-style encoder dict for --decoder/--vae-path."""
    if decoder == "pixel":
        if vae_path:
            raise ValueError("--vae-path: only used with --decoder sd-vae; drop it or pass --decoder sd-vae")
        return {"name": "pixel", "scaling_factor": 1.0}
    if not vae_path:
        raise ValueError("--vae-path: required with --decoder sd-vae (a local AutoencoderKL folder on the "
                         "machines that will load the model; ADVFLOW_VAE_PATH overrides it there)")
    return {"name": "sd-vae", "vae_path": os.path.abspath(vae_path), "scaling_factor": SD_VAE_SCALE}


def check_decoder(decoder: dict, channels: int) -> None:
    """Refuse a decoder that cannot turn this generator's samples into images (before any run is
    opened, so a mistake leaves nothing behind in MLflow)."""
    if decoder["name"] == "pixel" and channels not in (1, 3):
        raise ValueError(f"--decoder pixel: decodes 1- or 3-channel images, but this generator makes "
                         f"{channels}-channel samples (latents); pass --decoder sd-vae --vae-path DIR")
    if decoder["name"] == "sd-vae" and channels != 4:
        raise ValueError(f"--decoder sd-vae: decodes 4-channel SD-VAE latents, but this generator makes "
                         f"{channels}-channel samples; pass --decoder pixel")


# --layout cafm-sit: the version's tags and the first paragraph of its description. method=fm: a
# flow-matching velocity model, what a method cafm run takes as model.init (init_source.init_problem
# refuses any other method tag); a CAFM-post-trained SiT is still that kind of model.
LAYOUT_TAGS = {"method": "fm", "source_layout": "cafm-sit"}
CAFM_SIT_NOTE = (
    "Imported from the official CAFM-SiT checkpoint layout (ByteDance-Seed/Adversarial-Flow-Models, "
    "SiT's state dict): velocity(x_t, y, t) = CAFM's Generator(x_t, y, t) = -SiT(x_t, 1 - t, y); SiT's "
    "time flip and output sign are folded into t_embedder.mlp.0 and final_layer.linear, learn_sigma's "
    "extra output channels are dropped, time_scale=1 (SiT embeds t, not 1000 t)."
)


def build_cafm_sit(a: argparse.Namespace, sd, build, error):
    """The advflow generator of an official CAFM-SiT file (sd already read with --key)."""
    if a.kind not in (None, "multistep") or a.repeats not in (None, 1):
        raise error(f"--layout cafm-sit: a SiT / CAFM-SiT velocity model is a multistep generator (repeats 1); "
                    f"drop --kind {a.kind} / --repeats {a.repeats}")
    return build(sd, nfe=a.nfe)


def _fail(err) -> None:
    """The one line a user sees for a refused import (the cause and the flag that fixes it)."""
    from advflow.platform.log import get_logger

    get_logger("jobs.register_checkpoint").error("register_checkpoint: %s", err)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help=".safetensors or .pt/.pth/.ckpt/.bin state dict")
    p.add_argument("--name", required=True, help="registered model name (created if new)")
    p.add_argument("--layout", choices=["dit", "cafm-sit"], default="dit",
                   help="dit (default): AFM / DiT releases and advflow exports; cafm-sit: an official SiT or "
                        "CAFM-SiT generator (needs --nfe K; tagged method=fm)")
    p.add_argument("--key", default=None, help="wrapper entry holding the weights (default: ema, model, state_dict)")
    p.add_argument("--kind", choices=["1nfe", "multistep", "anystep"], default=None,
                   help="generator kind; required (or --repeats) when the weights fit both a multistep and a "
                        "depth-repeated 1nfe generator and nothing beside the file records which")
    p.add_argument("--nfe", type=int, default=None,
                   help="K steps: required for a multistep generator unless recorded; an anystep generator's "
                        "default step count (default 8)")
    p.add_argument("--repeats", type=int, default=None,
                   help="depth repetition R > 1 of a 1nfe generator (the same blocks run R times)")
    p.add_argument("--decoder", choices=["pixel", "sd-vae"], default="sd-vae",
                   help="how samples become images (default sd-vae: the released ImageNet latents)")
    p.add_argument("--vae-path", default=None, help="local AutoencoderKL folder for --decoder sd-vae")
    p.add_argument("--experiment", default="imports", help="MLflow experiment of the import run")
    p.add_argument("--alias", default=None, help="also point this alias at the new version")
    p.add_argument("--allow-new-architecture", action="store_true",
                   help="register even when size, kind, repeats or data shape differ from the model's latest version")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    import mlflow

    from advflow.platform.tracking.model_format import GeneratorSpec
    from advflow.platform.tracking.registry import architecture_change, log_generator
    from advflow.platform.tracking.runs import require_tracking_uri
    from advflow.trainers.dit_checkpoint import (
        CheckpointError,
        build_from_cafm_sit,
        build_from_checkpoint,
        infer_role,
        read_recorded,
        read_state_dict,
    )

    path = os.path.abspath(a.checkpoint)
    try:
        decoder = decoder_dict(a.decoder, a.vae_path)
        sd = read_state_dict(path, key=a.key)
        role = infer_role(sd)
        if role != "generator":
            raise CheckpointError(f"--checkpoint {path}: holds a {role}, not a generator; pass the generator file")
        if a.layout == "cafm-sit":
            G = build_cafm_sit(a, sd, build_from_cafm_sit, CheckpointError).eval()
        else:
            extra = {"nfe": a.nfe} if a.nfe is not None else {}
            # sd is a plain dict: pass what is recorded beside the file (metadata / sidecars) explicitly.
            G = build_from_checkpoint(sd, kind=a.kind, repeats=a.repeats, recorded=read_recorded(path), **extra).eval()
        cfg = G.config
        check_decoder(decoder, cfg["in_channels"])
        spec = GeneratorSpec(generator=dict(cfg), decoder=decoder,
                             data_shape=(cfg["in_channels"], cfg["input_size"], cfg["input_size"]),
                             num_classes=cfg["num_classes"])
        # Checked after the file (its errors need no server), before anything touches MLflow.
        require_tracking_uri("register_checkpoint")
        change = architecture_change(a.name, spec)
        if change and not a.allow_new_architecture:
            raise ValueError(
                f"--name {a.name}: this checkpoint's architecture differs from the model's latest {change}; "
                "versions behind one name should be interchangeable: use another --name, or pass "
                "--allow-new-architecture to register it anyway")
    except CheckpointError as e:
        # e.cli: the one-line form naming this job's flags (--kind / --nfe / --repeats), where there is one.
        _fail(f"--checkpoint {path}: {e.cli}" if e.cli else e)
        return 2
    except ValueError as e:  # TrackingURIMissing, ModelFormatError and the checks above
        _fail(e)
        return 2
    digest = sha256_file(path)
    source_tags = {"source_path": path, "source_sha256": digest}
    if a.layout == "cafm-sit":
        source_tags.update(LAYOUT_TAGS)
    mlflow.set_experiment(a.experiment)
    with mlflow.start_run(run_name=f"import-{os.path.basename(path)}") as run:
        mlflow.set_tags(source_tags)
        mlflow.log_params({f"generator.{k}": v for k, v in cfg.items()})
        if change:
            mlflow.set_tag("advflow.new_architecture", change)
        done = log_generator(
            G, decoder=decoder, data_shape=spec.data_shape,
            num_classes=cfg["num_classes"], registered_name=a.name, tags=source_tags, source="import",
        )
    if a.layout == "cafm-sit" and done.version is not None:
        client = mlflow.MlflowClient()
        mv = client.get_model_version(a.name, done.version)
        client.update_model_version(a.name, done.version,
                                    description=f"{CAFM_SIT_NOTE}\n\n{mv.description or ''}".rstrip())
    if a.alias:
        mlflow.MlflowClient().set_registered_model_alias(a.name, a.alias, done.version)
    print(f"registered {path} (sha256 {digest[:12]}...) as {done.registry_uri} "
          f"[{cfg['name']} kind={cfg['kind']} nfe={cfg['nfe']} repeats={cfg['repeats']}], run {run.info.run_id}"
          + (f", alias {a.alias}" if a.alias else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
