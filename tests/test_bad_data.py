"""Bad input fails loudly: every error names the shard or URI and the problem; nothing is skipped."""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import time

import numpy as np
import pytest

from advflow.platform.data.reader import LatentStream
from advflow.platform.data.shards import MANIFEST_NAME, ManifestError, ShardError, read_manifest, verify_dataset
from advflow.platform.data.storage import RetryPolicy, Storage, StorageAuthError, StorageUnavailableError
from helpers_data import make_dataset

N = 300
FAST = RetryPolicy(attempts=2, backoff_initial=0.05, backoff_max=0.1, connect_timeout=1, read_timeout=1)


def _drain(ds: LatentStream, batches: int) -> None:
    it = iter(ds)
    try:
        for _ in range(batches):
            next(it)
    finally:
        ds.close()


def _load_prepare_cli():
    path = os.path.join(os.path.dirname(__file__), "..", "jobs", "prepare_latents.py")
    spec = importlib.util.spec_from_file_location("prepare_latents_cli", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


def test_missing_manifest(storage_root):
    Storage(storage_root).write_atomic("shard-00000.bin", b"orphan shard, prepare never finished")
    with pytest.raises(ManifestError, match=r"manifest\.json: manifest not found"):
        LatentStream(storage_root, 4)
    with pytest.raises(ManifestError, match="manifest not found"):
        verify_dataset(storage_root)


def test_listed_shard_missing(storage_root):
    st, _ = make_dataset(storage_root, N)
    st.remove("shard-00001.bin")
    with pytest.raises(ShardError, match=r"shard-00001\.bin: listed in the manifest but missing"):
        LatentStream(storage_root, 4)
    # Without the up-front listing the read itself fails the same way.
    ds = LatentStream(storage_root, 4, check_sizes=False, shuffle=False)
    with pytest.raises(ShardError, match=r"shard-00001\.bin: listed in the manifest but missing"):
        _drain(ds, N)
    assert any("shard-00001.bin: listed in the manifest but missing" in p for p in verify_dataset(storage_root))


def test_truncated_shard(storage_root):
    st, m = make_dataset(storage_root, N)
    data = st.read("shard-00002.bin")
    st.write_atomic("shard-00002.bin", data[:-10])
    with pytest.raises(ShardError, match=r"shard-00002\.bin: truncated"):
        LatentStream(storage_root, 4)
    ds = LatentStream(storage_root, 4, check_sizes=False, shuffle=False)
    with pytest.raises(ShardError, match=r"shard-00002\.bin: truncated"):
        _drain(ds, N)
    assert any("shard-00002.bin: truncated" in p for p in verify_dataset(storage_root))


def test_checksum_mismatch_mid_training(storage_root, capsys):
    st, m = make_dataset(storage_root, N)
    ds = LatentStream(storage_root, 8, shuffle=False, shuffle_buffer=16, prefetch=1)
    it = iter(ds)
    next(it)  # training has started; the last shard has not been read yet
    data = bytearray(st.read("shard-00005.bin"))
    data[len(data) // 2] ^= 0xFF  # same size, one flipped byte
    st.write_atomic("shard-00005.bin", bytes(data))
    with pytest.raises(ShardError, match=r"shard-00005\.bin: checksum mismatch in chunk \d"):
        for _ in range(N):
            next(it)
    ds.close()
    problems = verify_dataset(storage_root)
    assert len(problems) == 1 and "shard-00005.bin: checksum mismatch" in problems[0]
    cli = _load_prepare_cli()
    assert cli.main(["--verify", storage_root]) == 1
    err = capsys.readouterr().err
    assert "shard-00005.bin" in err and "checksum mismatch" in err
    st.write_atomic("shard-00005.bin", bytes(data[: len(data) // 2]))
    assert cli.main(["--verify", storage_root]) == 1
    assert "shard-00005.bin: truncated" in capsys.readouterr().err


def test_wrong_dtype_in_shards(tmp_path):
    """Shards written as float32 under a manifest that says float16 (sizes made consistent)."""
    prefix = str(tmp_path / "d")
    st, m = make_dataset(prefix, N, dtype="float32")
    d = json.loads(st.read(MANIFEST_NAME))
    d["record"]["dtype"] = "float16"
    d["record"]["record_bytes"] = 2 * 3 * 3 * 2 + 8
    for s in d["shards"]:
        s["bytes"] = s["records"] * d["record"]["record_bytes"]
    st.write_atomic(MANIFEST_NAME, json.dumps(d).encode())
    with pytest.raises(ShardError, match=r"shard-00000\.bin: larger than the manifest says"):
        LatentStream(prefix, 4)


def test_unsupported_dtype_or_shape_in_manifest(tmp_path):
    prefix = str(tmp_path / "d")
    st, m = make_dataset(prefix, N)
    good = json.loads(st.read(MANIFEST_NAME))
    for field, value, msg in [("dtype", "int8", "dtype 'int8' not supported"),
                              ("shape", [2, 3], r"shape \[2, 3\] must be \(C, H, W\)")]:
        d = json.loads(json.dumps(good))
        d["record"][field] = value
        st.write_atomic(MANIFEST_NAME, json.dumps(d).encode())
        with pytest.raises(ManifestError, match=rf"manifest\.json: field 'record' is invalid: .*{msg}"):
            read_manifest(prefix)
    st.write_atomic(MANIFEST_NAME, json.dumps(good).encode())
    with pytest.raises(ValueError, match=r"records have shape \[2, 3, 3\] but expect_shape is \[4, 32, 32\]"):
        LatentStream(prefix, 4, expect_shape=(4, 32, 32))


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_nan_or_inf_record(storage_root, value):
    def poison(x, y, ids):
        if 137 in ids:
            x[list(ids).index(137), 1, 2, 2] = value

    make_dataset(storage_root, N, mutate=poison)  # checksums are valid: only the values are bad
    ds = LatentStream(storage_root, 10)
    with pytest.raises(ShardError, match=r"shard-00002\.bin: record 37 contains NaN or Inf"):
        _drain(ds, N)
    assert any("shard-00002.bin: record 37 contains NaN or Inf" in p for p in verify_dataset(storage_root))


def test_label_out_of_range(storage_root):
    def bad_label(x, y, ids):
        if 260 in ids:
            y[list(ids).index(260)] = 7  # num_classes is 7

    make_dataset(storage_root, N, mutate=bad_label)
    with pytest.raises(ShardError, match=r"shard-00005\.bin: record 10 has label 7, outside \[0, 7\)"):
        _drain(LatentStream(storage_root, 10), N)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.integration
def test_unreachable_endpoint_fails_in_bounded_time(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    endpoint = f"http://127.0.0.1:{_closed_port()}"
    t0 = time.monotonic()
    with pytest.raises(StorageUnavailableError) as err:
        LatentStream("s3://advflow-test/nowhere", 4, endpoint_url=endpoint, retry=FAST)
    assert time.monotonic() - t0 < FAST.worst_case_seconds() + 5
    msg = str(err.value)
    assert "s3://advflow-test/nowhere/manifest.json" in msg and endpoint in msg and "after 2 attempts" in msg


@pytest.mark.integration
def test_endpoint_that_never_answers_times_out(monkeypatch):
    """A server that accepts TCP connections but never replies (hung proxy, dead host behind a
    load balancer): the read timeout, not luck, ends each attempt."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    with socket.socket() as sink:
        sink.bind(("127.0.0.1", 0))
        sink.listen(16)  # the kernel completes handshakes; nobody ever reads or answers
        endpoint = f"http://127.0.0.1:{sink.getsockname()[1]}"
        t0 = time.monotonic()
        with pytest.raises(StorageUnavailableError, match="manifest.json: read failed after 2 attempts"):
            read_manifest("s3://advflow-test/hung", endpoint_url=endpoint, retry=FAST)
        elapsed = time.monotonic() - t0
    assert 2 * FAST.read_timeout <= elapsed < FAST.worst_case_seconds() + 5


@pytest.mark.integration
def test_rejected_credentials_fail_fast(s3_prefix):
    make_dataset(s3_prefix, 20, shard_records=10)
    # moto's IAM mode: from here on it checks every request's access key against its IAM
    # backend, where the fake key 'testing' does not exist, as AWS would for a revoked key.
    from moto.core.authorization import enable_iam_authentication

    with enable_iam_authentication():
        t0 = time.monotonic()
        with pytest.raises(StorageAuthError, match=r"manifest\.json: access denied or credentials rejected"):
            LatentStream(s3_prefix, 4, retry=FAST)
        assert time.monotonic() - t0 < 5  # not retried
