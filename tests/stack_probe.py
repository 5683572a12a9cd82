"""Seed a running `advflow stack` with what a restart must keep, or check that it is all still there.

    python tests/stack_probe.py seed  OUT   # in the stack's environment (advflow stack env)
    python tests/stack_probe.py check OUT   # after down/up or a kill/up: exit 0 only if all is kept

Run as a child process by tests/test_stack.py, so MLflow's and boto3's process-wide state (tracking
URI, clients) never leaks into the test session. What `seed` wrote, and how, is in OUT/expected.json;
each kind of data goes through the client that writes it in real use: a dataset through advflow's
Storage (s3fs), a checkpoint through pyarrow's S3 filesystem (Ray Train's) plus a multipart upload
(boto3), an MLflow run with an artifact and a registered generator with the alias `champion`, and
`jobs/generate.py --model models:/NAME@champion` for the images.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATASET = "datasets/restart"
CHECKPOINT = "checkpoints/restart/checkpoint_000002"


def _bucket() -> str:
    return os.environ["ADVFLOW_BUCKET"]


def _boto():
    import boto3

    return boto3.client("s3")  # endpoint and credentials from the stack's exported variables


def _arrow_fs():
    from pyarrow import fs

    endpoint = os.environ["AWS_ENDPOINT_URL"]
    return fs.S3FileSystem(
        endpoint_override=endpoint.split("://", 1)[1],
        scheme=endpoint.split("://", 1)[0],
        access_key=os.environ["AWS_ACCESS_KEY_ID"],
        secret_key=os.environ["AWS_SECRET_ACCESS_KEY"],
        region=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"),
    )


def _generate(name: str, out: Path) -> None:
    subprocess.run(
        [sys.executable, str(REPO / "jobs" / "generate.py"), "--model", f"models:/{name}@champion",
         "--labels", "0-3", "--per-label", "2", "--seed", "5", "--device", "cpu",
         "--out", str(out.with_suffix(".png")), "--npz", str(out)],
        check=True, timeout=300,
    )  # fmt: skip


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def seed(out: Path) -> None:
    import mlflow
    import torch
    from boto3.s3.transfer import TransferConfig

    from advflow.platform.data.storage import Storage
    from advflow.platform.tracking import registry
    from advflow.trainers.models import build_generator

    bucket = _bucket()
    objects: dict[str, str] = {}
    # A dataset, written as prepare_latents writes one (advflow Storage over s3fs).
    storage = Storage(f"s3://{bucket}/{DATASET}")
    shard = os.urandom(300_000)
    storage.write_atomic("shard-00000.bin", shard)
    storage.write_atomic("manifest.json", json.dumps({"shards": ["shard-00000.bin"]}).encode())
    objects[f"{DATASET}/shard-00000.bin"] = _sha(shard)
    objects[f"{DATASET}/manifest.json"] = _sha(json.dumps({"shards": ["shard-00000.bin"]}).encode())
    # A checkpoint, written as Ray Train uploads one (pyarrow), with a file large enough for a
    # multipart upload (boto3, 5 MiB parts).
    arrow = _arrow_fs()
    trainer = json.dumps({"step": 2}).encode()
    with arrow.open_output_stream(f"{bucket}/{CHECKPOINT}/trainer.json") as fh:
        fh.write(trainer)
    objects[f"{CHECKPOINT}/trainer.json"] = _sha(trainer)
    big = os.urandom(11 << 20)
    (out / "big.bin").write_bytes(big)
    _boto().upload_file(str(out / "big.bin"), bucket, f"{CHECKPOINT}/g/ds/model_states.bin",
                        Config=TransferConfig(multipart_threshold=5 << 20, multipart_chunksize=5 << 20))  # fmt: skip
    (out / "big.bin").unlink()
    objects[f"{CHECKPOINT}/g/ds/model_states.bin"] = _sha(big)

    # An MLflow run with an artifact, and a registered generator with the alias `champion`.
    torch.manual_seed(0)
    G = build_generator("tiny", in_channels=1, input_size=8, num_classes=10)
    with torch.no_grad():
        for p in G.parameters():
            p.add_(0.2 * torch.randn_like(p))
    name = f"restart-{uuid.uuid4().hex[:8]}"
    mlflow.set_experiment("stack-restart")
    with mlflow.start_run() as run:
        mlflow.log_text("kept across restarts", "notes/note.txt")
        done = registry.log_generator(G.eval(), decoder={"name": "pixel", "scaling_factor": 1.0},
                                      data_shape=(1, 8, 8), num_classes=10, registered_name=name)  # fmt: skip
    mlflow.MlflowClient().set_registered_model_alias(name, "champion", done.version)
    _generate(name, out / "reference.npz")
    expected = {"objects": objects, "run_id": run.info.run_id, "model": name, "version": done.version}
    (out / "expected.json").write_text(json.dumps(expected, indent=2))
    print("SEEDED", json.dumps(expected))


def check(out: Path, tag: str) -> None:
    import mlflow
    import numpy as np

    from advflow.platform.data.storage import Storage

    expected = json.loads((out / "expected.json").read_text())
    bucket = _bucket()
    client = _boto()
    for key, digest in expected["objects"].items():
        body = client.get_object(Bucket=bucket, Key=key)["Body"].read()
        assert _sha(body) == digest, f"s3://{bucket}/{key} changed or is gone"
    shard = Storage(f"s3://{bucket}/{DATASET}").read("shard-00000.bin", 1000, 2000)  # a range read
    assert len(shard) == 1000, "the dataset's range read came back short"
    from pyarrow import fs

    listed = _arrow_fs().get_file_info(fs.FileSelector(f"{bucket}/{CHECKPOINT}", recursive=True))
    files = sorted(info.path for info in listed if info.type == fs.FileType.File)
    assert files == sorted(f"{bucket}/{key}" for key in expected["objects"] if key.startswith(CHECKPOINT)), files

    mlflow_client = mlflow.MlflowClient()
    run = mlflow_client.get_run(expected["run_id"])
    assert run.info.status == "FINISHED", run.info.status
    note = mlflow.artifacts.download_artifacts(run_id=expected["run_id"], artifact_path="notes/note.txt",
                                               dst_path=str(out / f"dl-{tag}"))  # fmt: skip
    assert Path(note).read_text() == "kept across restarts"
    version = mlflow_client.get_model_version_by_alias(expected["model"], "champion")
    assert version.version == expected["version"], version

    _generate(expected["model"], out / f"after-{tag}.npz")
    want, got = np.load(out / "reference.npz"), np.load(out / f"after-{tag}.npz")
    np.testing.assert_array_equal(got["images"], want["images"])
    np.testing.assert_array_equal(got["labels"], want["labels"])
    print(f"ALL KEPT ({tag}): {len(expected['objects'])} objects, run {expected['run_id']}, "
          f"{expected['model']}@champion = version {version.version}, same images")  # fmt: skip


if __name__ == "__main__":
    command, folder = sys.argv[1], Path(sys.argv[2])
    folder.mkdir(parents=True, exist_ok=True)
    if command == "seed":
        seed(folder)
    elif command == "check":
        check(folder, sys.argv[3] if len(sys.argv) > 3 else "check")
    else:
        sys.exit(f"stack_probe.py: unknown command {command!r}; use seed or check")
