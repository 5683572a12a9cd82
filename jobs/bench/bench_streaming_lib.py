"""streaming-community (MosaicML Streaming fork) against raw boto3 GETs, same endpoint, same data, one run.

Evaluation script for the reader decision (adopt Streaming's StreamingDataset, or build the
canonical-partition order into advflow.platform.data.reader). It does NOT import advflow and is
meant for a scratch virtualenv, so that Streaming's dependency tree never touches the project's:

    python3 -m venv /tmp/scvenv
    /tmp/scvenv/bin/pip install torch==2.13.0
    echo torch==2.13.0 > /tmp/sc_constraints.txt      # else torchvision>=0.10 pulls torch 2.14 (CUDA)
    /tmp/scvenv/bin/pip install -c /tmp/sc_constraints.txt streaming-community numpy boto3 'moto[server]'
    /tmp/scvenv/bin/python jobs/bench/bench_streaming_lib.py --local-server

What it does, in one process (plus moto's S3 server in a subprocess on 127.0.0.1):

1. writes 256 MiB of synthetic 4x32x32 fp16 records (+ int64 label) as MDS shards with MDSWriter
   (columns x: "ndarray:float16:4,32,32", y: "int64"; ~16 MiB shards; hashes=["sha256"]),
   uploaded through the S3 endpoint;
2. alternates, --repeats times (median reported):
   (a) raw boto3 GET of every shard object, one at a time (MB/s, client CPU-ms/MB);
   (b) one epoch of StreamingDataset(remote=s3://..., local=<fresh temp cache>, shuffle=True,
       batch_size=256, num_canonical_nodes=64, validate_hash="sha256"), iterated in this process
       (no DataLoader workers), batches stacked to float32 (B,4,32,32) + int64 (B,) tensors:
       records/s, MB/s (payload 8200 B/record), client CPU-ms/MB, time to first batch, bytes in the cache;
3. exact mid-epoch resume: state_dict() -> JSON -> a new dataset's load_state_dict(); the batches after
   resume are compared with the uninterrupted run's;
4. elastic determinism: each simulated rank is a process of its own (a subprocess) with
   WORLD_SIZE/RANK, LOCAL_WORLD_SIZE=1/LOCAL_RANK=0 (a 1-rank "node", its own local leader and cache) and
   MASTER_ADDR=127.0.0.1: with WORLD_SIZE > 1 StreamingDataset initialises torch.distributed (gloo,
   env://) itself, so ranks cannot be simulated one after another in one process. The union of the
   ranks' t-th batches is compared with the 1-rank run's t-th batch, from epoch start and after a resume
   whose state_dict was taken at world size 1; then a world of 3 (which 64 canonical nodes do not divide).
   Streaming keys its shared memory host-wide (/dev/shm), so each simulated node runs under
   `unshare -m` with a private /dev/shm tmpfs and its own TMPDIR (root needed; see run_world);
5. shard-touch analysis from Streaming's own partition + shuffle functions (no I/O): which shards each
   physical node / rank reads in an epoch, for this dataset and a production-sized one.

The torchvision note: `import streaming` imports streaming.vision, which imports torchvision. The only
torchvision wheels on PyPI for torch 2.13 are CUDA-linked and fail to import beside the 2.13.0+cpu wheel
("operator torchvision::nms does not exist"). When that import fails (checked in a subprocess), this script
installs a stub `torchvision` module (VisionDataset / to_tensor placeholders) before importing streaming;
nothing measured here touches streaming.vision. It says so in its output.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import hashlib
import importlib.machinery
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import types
import warnings
from pathlib import Path

import numpy as np

RECORD_SHAPE = (4, 32, 32)
PAYLOAD_BYTES = int(np.prod(RECORD_SHAPE)) * 2 + 8  # 8200 B: what advflow's raw format stores per record
BUCKET = "streaming-bench"


# ----------------------------------------------------------------------------------------------- setup


def _torchvision_importable() -> bool:
    r = subprocess.run([sys.executable, "-c", "import torchvision"], capture_output=True, text=True)
    return r.returncode == 0


def stub_torchvision_if_broken() -> str:
    """Install a placeholder torchvision when the real one cannot be imported (see module doc)."""
    if _torchvision_importable():
        return "real torchvision imported"
    tv = types.ModuleType("torchvision")
    ds = types.ModuleType("torchvision.datasets")
    tr = types.ModuleType("torchvision.transforms")
    trf = types.ModuleType("torchvision.transforms.functional")

    class VisionDataset:  # what streaming.vision.base subclasses; never instantiated here
        def __init__(self, *a, **k):
            raise RuntimeError("torchvision stub: streaming.vision is unavailable beside the CPU torch wheel")

    def to_tensor(*a, **k):
        raise RuntimeError("torchvision stub")

    ds.VisionDataset = VisionDataset
    trf.to_tensor = to_tensor
    for m in (tv, ds, tr, trf):  # transformers' availability probe calls importlib.util.find_spec
        m.__spec__ = importlib.machinery.ModuleSpec(m.__name__, None)
    tv.datasets, tv.transforms, tr.functional = ds, tr, trf
    sys.modules.update({"torchvision": tv, "torchvision.datasets": ds, "torchvision.transforms": tr,
                        "torchvision.transforms.functional": trf})
    return "STUBBED torchvision (the installed CUDA-linked wheel does not import beside torch+cpu)"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def moto_server(log_dir: Path, timeout_s: float = 60.0):
    port = _free_port()
    log = open(log_dir / "moto.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"moto server exited with {proc.returncode}; see {log_dir / 'moto.log'}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("moto server did not open its port in time")
                time.sleep(0.2)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def _client():
    import boto3
    return boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])


def check_endpoint_resolution(endpoint: str) -> dict:
    """Which endpoint Streaming's own S3 clients resolve to with only AWS_ENDPOINT_URL set (no request
    is sent: only client.meta.endpoint_url is read)."""
    from streaming.base.storage.download import S3Downloader
    saved = os.environ.pop("S3_ENDPOINT_URL", None)
    try:
        d = S3Downloader()
        d._create_s3_client()
        down = d._s3_client.meta.endpoint_url
    finally:
        if saved is not None:
            os.environ["S3_ENDPOINT_URL"] = saved
    return {"downloader_endpoint_with_only_AWS_ENDPOINT_URL": down, "matches": down.rstrip("/") == endpoint}


# ------------------------------------------------------------------------------------------------ data


def write_mds(remote: str, size_mb: float, shard_mb: float, scratch: Path) -> dict:
    from streaming import MDSWriter
    n = int(size_mb * 2**20) // PAYLOAD_BYTES
    rng = np.random.default_rng(0)
    local = scratch / "mds-writer"
    t0, c0 = time.perf_counter(), time.process_time()
    with MDSWriter(out=(str(local), remote), columns={"x": f"ndarray:float16:{','.join(map(str, RECORD_SHAPE))}",
                                                      "y": "int64"},
                   size_limit=int(shard_mb * 2**20), hashes=["sha256"], progress_bar=False) as w:
        for a in range(0, n, 4096):
            b = min(n, a + 4096)
            x = rng.standard_normal((b - a, *RECORD_SHAPE), dtype=np.float32).astype(np.float16)
            y = rng.integers(0, 1000, b - a)
            for i in range(b - a):
                w.write({"x": x[i], "y": np.int64(y[i])})
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    bucket, _, key = remote[len("s3://"):].partition("/")
    index = json.loads(_client().get_object(Bucket=bucket, Key=f"{key}/index.json")["Body"].read())
    shards = [(s["raw_data"]["basename"], s["raw_data"]["bytes"], s["samples"], s["raw_data"]["hashes"])
              for s in index["shards"]]
    return {"records": n, "shards": shards, "write_s": dt, "write_cpu_s": cpu, "index": index}


# ------------------------------------------------------------------------------------------- measures


def raw_sequential(remote: str, shards: list) -> tuple[float, float]:
    bucket, _, key = remote[len("s3://"):].partition("/")
    c = _client()
    t0, c0 = time.perf_counter(), time.process_time()
    n = 0
    for name, *_ in shards:
        n += len(c.get_object(Bucket=bucket, Key=f"{key}/{name}")["Body"].read())
    return n / 2**20 / (time.perf_counter() - t0), 1e3 * (time.process_time() - c0) / (n / 2**20)


def _dir_bytes(path: str) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def make_dataset(remote: str, local: str, batch_size: int, ncn: int, validate: bool, **kw):
    from streaming import StreamingDataset
    return StreamingDataset(remote=remote, local=local, shuffle=True, batch_size=batch_size,
                            num_canonical_nodes=ncn, shuffle_seed=kw.pop("seed", 9176),
                            validate_hash="sha256" if validate else None, **kw)


def batches(ds, batch_size: int, limit: int | None = None, as_torch: bool = True):
    """Group the dataset's samples into batches of batch_size (the last one may be short)."""
    import torch
    xs, ys, k = [], [], 0
    for s in ds:
        xs.append(s["x"])
        ys.append(s["y"])
        if len(xs) == batch_size:
            x, y = np.stack(xs), np.asarray(ys, np.int64)
            yield (torch.from_numpy(x).float(), torch.from_numpy(y)) if as_torch else (x, y)
            xs, ys, k = [], [], k + 1
            if limit is not None and k >= limit:
                return
    if xs:
        x, y = np.stack(xs), np.asarray(ys, np.int64)
        yield (torch.from_numpy(x).float(), torch.from_numpy(y)) if as_torch else (x, y)


def streaming_epoch(remote: str, cache_root: Path, batch_size: int, ncn: int, validate: bool) -> dict:
    local = tempfile.mkdtemp(prefix="sd-cache-", dir=cache_root)
    t0, c0 = time.perf_counter(), time.process_time()
    ds = make_dataset(remote, local, batch_size, ncn, validate)
    t_ctor = time.perf_counter() - t0
    recs, t_first = 0, None
    for x, _y in batches(ds, batch_size):
        if t_first is None:
            t_first = time.perf_counter() - t0
        recs += x.shape[0]
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    disk = _dir_bytes(local)
    del ds
    gc.collect()
    shutil.rmtree(local, ignore_errors=True)
    mb = recs * PAYLOAD_BYTES / 2**20
    return {"records": recs, "rps": recs / dt, "mbs": mb / dt, "cpu_ms_per_mb": 1e3 * cpu / mb,
            "ctor_s": t_ctor, "first_batch_s": t_first, "cache_bytes": disk, "epoch_s": dt}


def _collect(ds, batch_size: int, n: int) -> list[tuple[np.ndarray, np.ndarray]]:
    return list(batches(ds, batch_size, limit=n, as_torch=False))


def _ids(x: np.ndarray, y: np.ndarray) -> list[bytes]:
    """One digest per sample (x bytes + label), to compare batches as multisets."""
    return sorted(hashlib.blake2b(x[i].tobytes() + y[i].tobytes(), digest_size=16).digest()
                  for i in range(len(y)))


def rank_worker(spec: dict) -> None:
    """One simulated rank (``--rank-worker``), in a process of its own: a 1-rank node (LOCAL_WORLD_SIZE=1)
    with its own cache. Streaming itself calls torch.distributed.init_process_group (gloo, env://) when
    WORLD_SIZE > 1. Writes {"ids": per-batch sample digests (hex), "cache_bytes", "error"} to spec["out"]."""
    out = {"ids": None, "cache_bytes": 0, "error": None}
    try:
        stub_torchvision_if_broken()
        warnings.filterwarnings("ignore")
        os.environ.update(WORLD_SIZE=str(spec["world"]), RANK=str(spec["rank"]), LOCAL_WORLD_SIZE="1",
                          LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(spec["port"]))
        ds = make_dataset(spec["remote"], spec["local"], spec["batch_size"], spec["ncn"], True)
        if spec["state_json"] is not None:
            ds.load_state_dict(json.loads(spec["state_json"]))
        out["ids"] = [[d.hex() for d in _ids(x, y)]
                      for x, y in batches(ds, spec["batch_size"], limit=spec["n"], as_torch=False)]
        out["cache_bytes"] = _dir_bytes(spec["local"])
    except BaseException as e:  # report to the parent instead of hanging it
        out["error"] = f"{type(e).__name__}: {e}"
    Path(spec["out"]).write_text(json.dumps(out))
    os._exit(0)  # do not wait on Streaming's background threads


def run_world(remote: str, cache_root: Path, world: int, batch_size: int, ncn: int, n: int,
              state_json: str | None, timeout_s: float = 300) -> dict:
    """Start `world` rank processes. Streaming names its shared memory host-wide (/dev/shm, first free
    prefix) and its file locks in TMPDIR, assuming ONE local leader per host; several simulated 1-rank
    nodes on one host collide there (FileExistsError '/000000_locals'). So each rank runs in a mount
    namespace of its own with a private tmpfs on /dev/shm (util-linux unshare, needs root) and its own TMPDIR."""
    port = _free_port()
    procs, outs = [], []
    for r in range(world):
        d = Path(tempfile.mkdtemp(prefix=f"sd-r{r}-", dir=cache_root))
        (d / "tmp").mkdir()
        spec = {"remote": remote, "local": str(d / "cache"), "world": world, "rank": r, "port": port,
                "batch_size": batch_size, "ncn": ncn, "n": n, "state_json": state_json, "out": str(d / "out.json")}
        cmd = ["unshare", "-m", "--propagation", "private", "sh", "-c",
               'mount -t tmpfs tmpfs /dev/shm && exec "$@"', "sh",
               sys.executable, os.path.abspath(__file__), "--rank-worker", json.dumps(spec)]
        procs.append(subprocess.Popen(cmd, env={**os.environ, "TMPDIR": str(d / "tmp")},
                                      stdout=subprocess.DEVNULL, stderr=open(d / "stderr.log", "wb")))
        outs.append(d)
    res = {}
    deadline = time.monotonic() + timeout_s
    for r, (pr, d) in enumerate(zip(procs, outs)):
        try:
            pr.wait(max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pr.kill()
        try:
            o = json.loads((d / "out.json").read_text())
        except FileNotFoundError:
            o = {"ids": None, "cache_bytes": 0,
                 "error": f"rc={pr.returncode}: " + (d / "stderr.log").read_text()[-400:]}
        res[r] = (None if o["ids"] is None else [[bytes.fromhex(h) for h in bt] for bt in o["ids"]],
                  o["cache_bytes"], o["error"])
    return res


def resume_and_elastic(remote: str, cache_root: Path, batch_size: int, ncn: int, k: int, total: int,
                       world_sizes: list[int]) -> dict:
    out: dict = {}

    def fresh():
        return tempfile.mkdtemp(prefix="sd-cache-", dir=cache_root)

    # uninterrupted reference at world size 1 (this process)
    ref = _collect(make_dataset(remote, fresh(), batch_size, ncn, True), batch_size, total)
    # interrupted run: k batches, then state_dict -> JSON -> a new dataset
    a = make_dataset(remote, fresh(), batch_size, ncn, True)
    head = _collect(a, batch_size, k)
    state = a.state_dict(num_samples=k * batch_size, from_beginning=False)
    state_json = json.dumps(state, sort_keys=True)
    out["state_dict"] = state
    out["state_json_bytes"] = len(state_json)
    out["head_equal"] = all(np.array_equal(p[0], q[0]) and np.array_equal(p[1], q[1])
                            for p, q in zip(head, ref[:k]))
    b = make_dataset(remote, fresh(), batch_size, ncn, True)
    b.load_state_dict(json.loads(state_json))
    t0 = time.perf_counter()
    it = batches(b, batch_size, limit=total - k, as_torch=False)
    tail = [next(it)]
    out["resume_first_batch_s"] = time.perf_counter() - t0
    tail += list(it)
    out["resume_exact"] = len(tail) == total - k and all(
        np.array_equal(p[0], q[0]) and np.array_equal(p[1], q[1]) for p, q in zip(tail, ref[k:]))
    out["resume_batches_compared"] = len(tail)

    # elastic: W ranks (real processes), per-rank batch batch_size / W (same global batch)
    ref_ids = [_ids(x, y) for x, y in ref]
    for w in world_sizes:
        if batch_size % w:
            out[f"world{w}"] = f"skipped: per-rank batch {batch_size}/{w} is not an integer"
            continue
        bs = batch_size // w
        for mode in ("from_start", "resume_from_world1"):
            n = total if mode == "from_start" else total - k
            try:
                res = run_world(remote, cache_root, w, bs, ncn, n, state_json if mode != "from_start" else None)
                errs = {r: e for r, (_, _, e) in res.items() if e}
                if errs:
                    out[f"world{w}_{mode}"] = f"errors: {errs}"
                    continue
                glob = [sorted(sum((res[r][0][t] for r in range(w)), [])) for t in range(len(res[0][0]))]
                want = ref_ids if mode == "from_start" else ref_ids[k:]
                same = len(glob) == len(want) and all(g == h for g, h in zip(glob, want))
                out[f"world{w}_{mode}"] = {"global_batches_equal_as_sets": same, "compared": len(glob),
                                           "cache_MiB_per_rank": [round(res[r][1] / 2**20, 1) for r in range(w)]}
            except Exception as e:  # report, do not hide
                out[f"world{w}_{mode}"] = f"{type(e).__name__}: {e}"
    # a world the canonical nodes do not divide, from the start
    try:
        res = run_world(remote, cache_root, 3, 64, ncn, 2, None, timeout_s=120)
        out["world3_from_start"] = {r: (e or "ok") for r, (_, _, e) in res.items()}
    except Exception as e:
        out["world3_from_start"] = f"{type(e).__name__}: {e}"
    return out


def shard_touch(shard_samples: list[int], ncn: int, layouts: list[tuple[int, int]], batch_size: int,
                seed: int = 9176) -> dict:
    """Which shards each node / rank reads in epoch 0, from Streaming's own partition and shuffle."""
    from streaming.base.partition import get_partitions
    from streaming.base.shuffle import get_shuffle
    sizes = np.asarray(shard_samples, np.int64)
    n = int(sizes.sum())
    shard_of = np.repeat(np.arange(len(sizes)), sizes)
    block = max(4_000_000 // ncn, 1 << 18)
    shuffle = get_shuffle("py1e", sizes, ncn, seed, 0, block)
    res = {}
    for nodes, rpn in layouts:
        try:
            ids = get_partitions("relaxed", n, ncn, nodes, rpn, 1, batch_size, 0, None)
        except ValueError as e:
            res[f"{nodes}x{rpn}"] = f"ValueError: {e}"
            continue
        ids = np.where(ids != -1, shuffle[ids], -1)
        per_node = [len(np.unique(shard_of[ids[p][ids[p] != -1]])) for p in range(nodes)]
        per_rank = [len(np.unique(shard_of[ids[p, r][ids[p, r] != -1]])) for p in range(nodes) for r in range(rpn)]
        res[f"{nodes}x{rpn}"] = {"shards_total": len(sizes),
                                 "shards_per_node(min,max)": (min(per_node), max(per_node)),
                                 "ideal_per_node": -(-len(sizes) // nodes),
                                 "shards_per_rank(min,max)": (min(per_rank), max(per_rank))}
    return res


# ------------------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--local-server", action="store_true", help="start moto's S3 server on 127.0.0.1 (required)")
    p.add_argument("--size-mb", type=float, default=256)
    p.add_argument("--shard-mb", type=float, default=16)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--num-canonical-nodes", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-validate", action="store_true", help="validate_hash=None in the timed epochs")
    p.add_argument("--resume-at", type=int, default=24, help="batches before the interruption")
    p.add_argument("--resume-total", type=int, default=48, help="batches compared in the resume checks")
    p.add_argument("--world-sizes", default="2,4")
    p.add_argument("--skip-checks", action="store_true", help="only the timed runs")
    p.add_argument("--json-out", help="also write all results here")
    p.add_argument("--rank-worker", help=argparse.SUPPRESS)  # internal: one simulated rank (JSON spec)
    args = p.parse_args(argv)
    if args.rank_worker:
        rank_worker(json.loads(args.rank_worker))
        return 0
    if not args.local_server:
        p.error("only --local-server is implemented (it needs an S3 endpoint it may write to)")

    tv_note = stub_torchvision_if_broken()
    warnings.filterwarnings("ignore", module="streaming")
    import streaming
    import torch
    versions = {"python": sys.version.split()[0], "streaming": streaming.__version__, "torch": torch.__version__,
                "numpy": np.__version__}
    import boto3, botocore, moto  # noqa: E401
    versions.update(boto3=boto3.__version__, botocore=botocore.__version__, moto=moto.__version__)
    print(f"versions {versions}\ntorchvision: {tv_note}")

    results: dict = {"versions": versions, "torchvision": tv_note, "args": vars(args)}
    with contextlib.ExitStack() as cleanup:
        scratch = Path(cleanup.enter_context(tempfile.TemporaryDirectory(prefix="advflow-bench-streaming-")))
        endpoint = cleanup.enter_context(moto_server(scratch))
        os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                          AWS_DEFAULT_REGION="us-east-1", AWS_ENDPOINT_URL=endpoint)
        ep = check_endpoint_resolution(endpoint)
        results["endpoint"] = ep
        print(f"endpoint {endpoint}; Streaming's S3 client with only AWS_ENDPOINT_URL set -> "
              f"{ep['downloader_endpoint_with_only_AWS_ENDPOINT_URL']} (match: {ep['matches']})")
        if not ep["matches"]:  # never let a client fall through to a public endpoint
            os.environ["S3_ENDPOINT_URL"] = endpoint
            print("  -> S3_ENDPOINT_URL set as well")
        _client().create_bucket(Bucket=BUCKET)
        remote = f"s3://{BUCKET}/mds"
        data = write_mds(remote, args.size_mb, args.shard_mb, scratch)
        shards = data["shards"]
        total_b = sum(s[1] for s in shards)
        print(f"wrote {data['records']} records in {len(shards)} MDS shards ({total_b / 2**20:.1f} MiB, "
              f"{total_b / data['records']:.1f} B/record incl. MDS offsets vs {PAYLOAD_BYTES} payload), "
              f"first shard {shards[0][1] / 2**20:.2f} MiB / {shards[0][2]} records, hashes "
              f"{sorted(shards[0][3])}; MDSWriter+upload {data['write_s']:.1f} s ({data['write_cpu_s']:.1f} CPU s)")
        results["dataset"] = {"records": data["records"], "shards": len(shards), "bytes": total_b,
                              "shard_bytes_first": shards[0][1], "index_json_keys": sorted(data["index"]),
                              "column_encodings": data["index"]["shards"][0]["column_encodings"]}

        cache_root = scratch / "caches"
        cache_root.mkdir()
        raw_sequential(remote, shards)  # warm-up, untimed
        raw, raw_cpu, runs = [], [], []
        for r in range(args.repeats):
            a, b = raw_sequential(remote, shards)
            raw.append(a)
            raw_cpu.append(b)
            s = streaming_epoch(remote, cache_root, args.batch_size, args.num_canonical_nodes, not args.no_validate)
            runs.append(s)
            print(f"  run {r}: raw seq {a:.1f} MB/s ({b:.2f} cpu-ms/MB)  streaming {s['rps']:,.0f} rec/s "
                  f"{s['mbs']:.1f} MB/s ({s['cpu_ms_per_mb']:.2f} cpu-ms/MB) ctor {s['ctor_s']:.2f} s "
                  f"first batch {s['first_batch_s']:.2f} s cache {s['cache_bytes'] / 2**20:.1f} MiB "
                  f"({s['records']} records)")
        med = statistics.median
        summary = {"raw_mbs": med(raw), "raw_cpu_ms_per_mb": med(raw_cpu)}
        for key in ("rps", "mbs", "cpu_ms_per_mb", "ctor_s", "first_batch_s", "cache_bytes", "epoch_s"):
            summary[f"streaming_{key}"] = med([s[key] for s in runs])
        results["runs"] = {"raw_mbs": raw, "raw_cpu_ms_per_mb": raw_cpu, "streaming": runs}
        results["summary"] = summary
        print(f"raw boto3 GET, whole shards, sequential : {summary['raw_mbs']:8.1f} MB/s  "
              f"{summary['raw_cpu_ms_per_mb']:.2f} cpu-ms/MB")
        print(f"StreamingDataset 1 epoch (batch {args.batch_size}, ncn {args.num_canonical_nodes}, validate "
              f"{not args.no_validate}) : {summary['streaming_rps']:8,.0f} records/s  {summary['streaming_mbs']:8.1f} MB/s"
              f"  {summary['streaming_cpu_ms_per_mb']:.2f} cpu-ms/MB  first batch {summary['streaming_first_batch_s']:.2f} s"
              f"  cache {summary['streaming_cache_bytes'] / 2**20:.1f} MiB")
        print(f"ratio streaming / raw : {summary['streaming_mbs'] / summary['raw_mbs']:.2f}x")

        if not args.skip_checks:
            ws = [int(v) for v in args.world_sizes.split(",") if v]
            chk = resume_and_elastic(remote, cache_root, args.batch_size, args.num_canonical_nodes,
                                     args.resume_at, args.resume_total, ws)
            results["checks"] = chk
            print("checks:")
            for kk, v in chk.items():
                print(f"  {kk}: {v}")
            touch = {"this_dataset": shard_touch([s[2] for s in shards], args.num_canonical_nodes,
                                                 [(1, 1), (2, 1), (4, 1), (1, 8), (8, 8), (3, 1)], args.batch_size)}
            per = shards[0][2]  # production-sized: 2.56M records (ImageNet + flips) in shards like these
            touch["2.56M_records"] = shard_touch([per] * (2_562_334 // per), args.num_canonical_nodes,
                                                 [(8, 8), (16, 8), (4, 8)], args.batch_size)
            results["shard_touch"] = touch
            print("shard touch (epoch 0, Streaming's partition+shuffle):")
            for kk, v in touch.items():
                for lay, vv in v.items():
                    print(f"  {kk} {lay}: {vv}")
        if args.json_out:
            Path(args.json_out).write_text(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
