"""Shard format, manifest and storage layer (retries, atomic writes, endpoint override)."""

from __future__ import annotations

import hashlib
import json
import struct
import time

import numpy as np
import pytest
from botocore.exceptions import ClientError, EndpointConnectionError, ReadTimeoutError

from advflow.platform.data.shards import (
    MANIFEST_NAME, Manifest, ManifestError, RecordSpec, checksums, read_manifest, verify_dataset,
)
from advflow.platform.data.storage import (
    RetryPolicy, Storage, StorageAuthError, StorageUnavailableError, classify_error, resolve_endpoint,
)
from helpers_data import FlakyProxy, make_dataset

FAST = RetryPolicy(attempts=3, backoff_initial=0.01, backoff_max=0.02, connect_timeout=1, read_timeout=2)


def _client_error(code: str, status: int) -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": "x"}, "ResponseMetadata": {"HTTPStatusCode": status}},
                       "GetObject")


# -- record layout ---------------------------------------------------------------------------------
def test_record_layout_is_fixed_size_little_endian():
    spec = RecordSpec((1, 2, 2), "float16")
    assert spec.record_bytes == 4 * 2 + 8  # 4 fp16 values + int64 label
    x = np.arange(12, dtype=np.float32).reshape(3, 1, 2, 2)
    y = np.array([5, 6, 7])
    buf = spec.encode(x, y)
    assert len(buf) == 3 * spec.record_bytes
    # Independent decode with struct: record i starts at i * record_bytes.
    for i in range(3):
        off = i * spec.record_bytes
        vals = struct.unpack("<4e", buf[off:off + 8])
        (label,) = struct.unpack("<q", buf[off + 8:off + 16])
        assert list(vals) == [4 * i, 4 * i + 1, 4 * i + 2, 4 * i + 3]
        assert label == 5 + i
    dx, dy = spec.decode(buf)
    np.testing.assert_array_equal(dx, x)
    np.testing.assert_array_equal(dy, y)


def test_record_spec_rejects_bad_dtype_and_shape():
    with pytest.raises(ValueError, match="dtype"):
        RecordSpec((4, 8, 8), "int8")
    with pytest.raises(ValueError, match="shape"):
        RecordSpec((4, 8), "float16")  # type: ignore[arg-type]


def test_chunk_checksums_match_hashlib_on_slices():
    spec = RecordSpec((1, 1, 1), "float32")  # 12 bytes per record
    data = bytes(range(12 * 10))
    whole, chunks = checksums(data, spec, chunk_records=4)
    assert whole == hashlib.sha256(data).hexdigest()
    assert chunks == [hashlib.sha256(data[a:b]).hexdigest() for a, b in [(0, 48), (48, 96), (96, 120)]]


# -- manifest ------------------------------------------------------------------------------------
def test_manifest_round_trip_and_fields(storage_root):
    storage, m = make_dataset(storage_root, n=120, shard_records=50, chunk_records=16)
    got = read_manifest(storage_root)
    assert got.num_records == 120 and [s.records for s in got.shards] == [50, 50, 20]
    assert got.shape == (2, 3, 3) and got.record.dtype == "float32" and got.num_classes == 7
    assert got.chunk_bounds(got.shards[2]) == [(0, 16), (16, 20)]
    raw = json.loads(storage.read(MANIFEST_NAME))
    for key in ("record", "shards", "encoder", "channel_mean", "channel_std", "num_classes", "params"):
        assert key in raw
    assert raw["shards"][0]["bytes"] == 50 * got.record.record_bytes
    assert raw["shards"][0]["sha256"] == hashlib.sha256(storage.read(raw["shards"][0]["name"])).hexdigest()
    assert verify_dataset(storage_root) == []


def test_manifest_rejects_inconsistent_sizes(tmp_path):
    _, m = make_dataset(str(tmp_path), n=20, shard_records=10)
    d = json.loads(m.to_json())
    d["record"]["dtype"] = "float16"  # shard byte counts no longer fit the declared records
    d["record"].pop("record_bytes")
    with pytest.raises(ManifestError, match="shard-00000.bin.*wrong dtype or shape"):
        Manifest.from_json(json.dumps(d), "mem://manifest.json")


# -- storage -------------------------------------------------------------------------------------
def test_storage_write_read_list(storage_root):
    st = Storage(storage_root)
    st.write_atomic("a.bin", b"0123456789")
    st.write_atomic("a.bin", b"abcdefghij")  # replace
    assert st.read("a.bin") == b"abcdefghij"
    assert st.read("a.bin", 2, 5) == b"cde"
    assert st.list_sizes() == {"a.bin": 10}
    with pytest.raises(FileNotFoundError, match=r"missing\.bin: not found"):
        st.read("missing.bin")


def test_local_atomic_write_leaves_no_temp_files(tmp_path):
    st = Storage(str(tmp_path / "d"))
    st.write_atomic("x.json", b"{}")
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["x.json"]


def test_endpoint_override_from_environment(monkeypatch):
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    assert resolve_endpoint(None) == "http://127.0.0.1:9"
    assert resolve_endpoint("http://x:1") == "http://x:1"
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:10")
    assert Storage("s3://b/p").endpoint_url == "http://127.0.0.1:10"


@pytest.mark.parametrize(
    "exc,kind",
    [
        (_client_error("SlowDown", 503), "transient"),
        (_client_error("InternalError", 500), "transient"),
        (_client_error("Throttling", 400), "transient"),
        (_client_error("InvalidAccessKeyId", 403), "auth"),
        (_client_error("NoSuchKey", 404), "missing"),
        (_client_error("InvalidArgument", 400), "fatal"),
        (ReadTimeoutError(endpoint_url="http://h"), "transient"),
        (EndpointConnectionError(endpoint_url="http://h"), "transient"),
        (ValueError("bug"), "fatal"),
    ],
)
def test_error_classification(exc, kind):
    assert classify_error(exc) == kind
    wrapped = OSError("s3fs translated")  # s3fs re-raises botocore errors with the cause attached
    wrapped.__cause__ = exc
    assert classify_error(wrapped) == kind


def test_retry_recovers_from_transient_errors():
    st = Storage("s3://b/p", retry=FAST)
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise _client_error("SlowDown", 503)
        return "ok"

    assert st.call("read", "k", flaky) == "ok" and len(calls) == 3


def test_retry_gives_up_with_uri_and_endpoint(monkeypatch):
    st = Storage("s3://b/p", endpoint_url="http://127.0.0.1:9", retry=FAST)
    calls = []

    def down():
        calls.append(1)
        raise ReadTimeoutError(endpoint_url="http://127.0.0.1:9")

    with pytest.raises(StorageUnavailableError, match=r"s3://b/p/k: read failed after 3 attempts \(endpoint http://127.0.0.1:9\)"):
        st.call("read", "k", down)
    assert len(calls) == 3


def test_auth_errors_are_not_retried():
    st = Storage("s3://b/p", retry=FAST)
    calls = []

    def denied():
        calls.append(1)
        raise _client_error("InvalidAccessKeyId", 403)

    with pytest.raises(StorageAuthError, match="s3://b/p/k: access denied or credentials rejected"):
        st.call("read", "k", denied)
    assert len(calls) == 1


def test_worst_case_bound_is_computed():
    p = RetryPolicy(attempts=3, backoff_initial=1, backoff_max=1.5, connect_timeout=2, read_timeout=3)
    assert p.worst_case_seconds() == 3 * 5 + 1 + 1.5


@pytest.mark.integration
def test_retries_through_real_http_503s(s3_prefix, moto_endpoint, monkeypatch):
    """End to end: an endpoint that answers 503 SlowDown twice, then serves; the read succeeds."""
    Storage(s3_prefix).write_atomic("obj.bin", b"payload")
    with FlakyProxy(moto_endpoint, failures=2) as proxy:
        st = Storage(s3_prefix, endpoint_url=proxy.url, retry=FAST)
        t0 = time.monotonic()
        assert st.read("obj.bin") == b"payload"
        # two injected 503s, then the read's own requests (s3fs sends HEAD + GET for whole objects)
        assert proxy.remaining == 0 and proxy.requests >= 3 and time.monotonic() - t0 < 10
    with FlakyProxy(moto_endpoint, failures=100) as proxy:
        st = Storage(s3_prefix, endpoint_url=proxy.url, retry=FAST)
        with pytest.raises(StorageUnavailableError, match="obj.bin: read failed after 3 attempts"):
            st.read("obj.bin")
        assert proxy.requests == 3  # exactly our attempts: botocore and s3fs retries are off
