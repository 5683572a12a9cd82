"""Storage.read_verified (a byte range and its sha256 in one pass) and Storage's I/O counters, on a
local directory and the test S3 endpoint: same bytes and digest as read + hashlib, exact counts,
retries that restart the hash, and the usual missing / auth errors."""

from __future__ import annotations

import hashlib
import os
import pickle
import re
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import urllib3.exceptions
from botocore import exceptions as bexc
from botocore.response import StreamingBody

from advflow.platform.data.storage import (
    RetryPolicy, Storage, StorageAuthError, StorageUnavailableError, classify_error,
)
from conftest import BUCKET, FAKE_ENV
from helpers_data import FlakyProxy

FAST = RetryPolicy(attempts=3, backoff_initial=0.01, backoff_max=0.02, connect_timeout=2, read_timeout=2)
# Over three 1 MiB pieces of a streamed body, not a multiple of one.
DATA = np.random.default_rng(0).integers(0, 256, 3 * 2**20 + 12345, dtype=np.uint8).tobytes()
SIZE = len(DATA)
# Inside the object, across piece boundaries, the whole object, past its end, and wholly after it.
RANGES = [(1000, 2**20 + 7), (2**20, 3 * 2**20), (0, SIZE), (SIZE - 100, SIZE + 5000), (SIZE + 1, SIZE + 10)]


def _sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def test_same_bytes_and_digest_as_read(storage_root):
    st = Storage(storage_root)
    st.write_atomic("obj.bin", DATA)
    for a, b in RANGES:
        view, digest = st.read_verified("obj.bin", a, b)
        assert bytes(view) == DATA[a:b], (a, b)
        assert digest == _sha(DATA[a:b]), (a, b)
        if a < SIZE:  # (s3fs's read refuses a range that starts past the end)
            assert bytes(view) == st.read("obj.bin", a, b)
    view, digest = st.read_verified("obj.bin", 7, 7)
    assert len(view) == 0 and digest == _sha(b"")
    # numpy reads the buffer in place: no copy between the bytes received and the array
    view, _ = st.read_verified("obj.bin", 0, 4096)
    x = np.frombuffer(view, np.uint8)
    view[0] = (view[0] + 1) % 256
    assert x[0] == view[0]
    with pytest.raises(ValueError, match="bad byte range"):
        st.read_verified("obj.bin", 10, 5)


def test_counters_count_requests_and_bytes_exactly(storage_root):
    st = Storage(storage_root)
    st.write_atomic("obj.bin", DATA)
    st.write_atomic("small.json", b"{}")
    assert st.io_counters() == {"requests": 0, "bytes": 0}  # writes are not reads
    sizes = [10, 2**20 + 5, 100]
    for k, n in enumerate(sizes):
        assert len(st.read_verified("obj.bin", 1000 * k, 1000 * k + n)[0]) == n
    assert st.io_counters() == {"requests": 3, "bytes": sum(sizes)}
    assert st.read("small.json") == b"{}"
    st.read_verified("obj.bin", SIZE - 4, SIZE + 4)  # short: counts what came
    assert st.io_counters() == {"requests": 5, "bytes": sum(sizes) + 2 + 4}
    with pytest.raises(FileNotFoundError):
        st.read_verified("absent.bin", 0, 10)  # a failed attempt is a request too
    assert st.io_counters() == {"requests": 6, "bytes": sum(sizes) + 6}
    # A pickled copy (a DataLoader worker) counts its own I/O from zero; the original is unchanged.
    copy = pickle.loads(pickle.dumps(st))
    assert copy.io_counters() == {"requests": 0, "bytes": 0}
    assert bytes(copy.read_verified("obj.bin", 5, 9)[0]) == DATA[5:9]
    assert copy.io_counters() == {"requests": 1, "bytes": 4}
    assert st.io_counters() == {"requests": 6, "bytes": sum(sizes) + 6}
    st.reset_io_counters()
    assert st.io_counters() == {"requests": 0, "bytes": 0}


def test_counters_are_thread_safe(tmp_path):
    st = Storage(str(tmp_path))
    st.write_atomic("obj.bin", DATA[:4096])

    def work(k: int) -> None:
        for i in range(50):
            view, digest = st.read_verified("obj.bin", k, k + 1 + i)
            assert digest == _sha(DATA[k:k + 1 + i])

    threads = [threading.Thread(target=work, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert st.io_counters() == {"requests": 8 * 50, "bytes": 8 * sum(range(1, 51))}


def test_missing_object_names_the_uri(storage_root):
    st = Storage(storage_root)
    st.write_atomic("other.bin", b"x")
    with pytest.raises(FileNotFoundError, match=re.escape(st.url("absent.bin")) + r": not found \(read\)"):
        st.read_verified("absent.bin", 0, 10)


# -- retries, with a fake S3 client (no server) ---------------------------------------------------


class _Raw:
    """A urllib3-like raw body: `data`, then `fail` raised on the next read (or, with fail=None,
    the end of the body: shorter than its Content-Length, as when the server closes the connection)."""

    def __init__(self, data: bytes, fail: BaseException | None = None):
        self.data, self.pos, self.fail = data, 0, fail

    def readinto(self, b) -> int:
        if self.pos == len(self.data) and self.fail is not None:
            raise self.fail
        n = min(len(b), len(self.data) - self.pos)
        b[:n] = self.data[self.pos:self.pos + n]
        self.pos += n
        return n

    def close(self) -> None:
        pass


class _FakeS3:
    """get_object over one object; the first `failures` bodies are corrupt and break off."""

    def __init__(self, data: bytes, failures: int, fail: BaseException | None):
        self.data, self.failures, self.fail, self.calls = data, failures, fail, 0

    def get_object(self, Bucket: str, Key: str, Range: str) -> dict:  # noqa: N803 - botocore's names
        a, b = (int(v) for v in Range.removeprefix("bytes=").split("-"))
        body = self.data[a:b + 1]
        self.calls += 1
        if self.calls <= self.failures:
            # wrong bytes first: a retry that kept the buffer or the hasher would show it
            raw = _Raw(bytes(255 - v for v in body[: 2**20 + 3]), self.fail)
        else:
            raw = _Raw(body)
        return {"Body": StreamingBody(raw, len(body))}


@pytest.mark.parametrize("fail", [
    urllib3.exceptions.ReadTimeoutError(None, "/", "read timed out"),  # botocore: ReadTimeoutError
    urllib3.exceptions.ProtocolError("Connection broken: reset by peer"),  # ResponseStreamingError
    None,  # body ends early: botocore's IncompleteReadError
], ids=["read-timeout", "connection-reset", "short-body"])
def test_transient_failure_mid_body_is_retried_from_scratch(monkeypatch, fail):
    fake = _FakeS3(DATA, failures=2, fail=fail)
    monkeypatch.setattr(Storage, "_make_client", lambda self: fake)
    st = Storage(f"s3://{BUCKET}/p", endpoint_url="http://127.0.0.1:9", retry=FAST)
    a, b = 1000, SIZE - 1000
    view, digest = st.read_verified("obj.bin", a, b)
    assert fake.calls == 3
    assert bytes(view) == DATA[a:b] and digest == _sha(DATA[a:b])
    assert st.io_counters() == {"requests": 3, "bytes": 2 * (2**20 + 3) + (b - a)}


def test_a_body_that_keeps_failing_makes_the_store_unavailable(monkeypatch):
    fake = _FakeS3(DATA, failures=99, fail=urllib3.exceptions.ProtocolError("reset"))
    monkeypatch.setattr(Storage, "_make_client", lambda self: fake)
    st = Storage(f"s3://{BUCKET}/p", endpoint_url="http://127.0.0.1:9", retry=FAST)
    with pytest.raises(StorageUnavailableError, match=rf"s3://{BUCKET}/p/obj.bin: read failed after 3 attempts"):
        st.read_verified("obj.bin", 0, SIZE)
    assert fake.calls == 3 and st.io_counters()["requests"] == 3


def _client_error(code: str, status: int) -> bexc.ClientError:
    response = {"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}
    return bexc.ClientError(response, "GetObject")  # type: ignore[arg-type]


@pytest.mark.parametrize("exc, kind", [
    (bexc.ReadTimeoutError(endpoint_url="http://x"), "transient"),
    (bexc.ConnectTimeoutError(endpoint_url="http://x"), "transient"),
    (bexc.EndpointConnectionError(endpoint_url="http://x"), "transient"),
    (bexc.ResponseStreamingError(error="reset"), "transient"),
    (bexc.IncompleteReadError(actual_bytes=1, expected_bytes=2), "transient"),
    (_client_error("SlowDown", 503), "transient"),
    (_client_error("InternalError", 500), "transient"),
    (_client_error("NoSuchKey", 404), "missing"),
    (_client_error("InvalidAccessKeyId", 403), "auth"),
    (bexc.NoCredentialsError(), "auth"),
])
def test_botocore_errors_are_classified(exc, kind):
    assert classify_error(exc) == kind


# -- the real client against the test endpoint ----------------------------------------------------


class _BreaksAfter:
    """Wraps a real GET body: raises botocore's ReadTimeoutError once `after` bytes have passed."""

    def __init__(self, body, after: int):
        self.body, self.after, self.seen = body, after, 0

    def readinto(self, b) -> int:
        if self.seen >= self.after:
            raise bexc.ReadTimeoutError(endpoint_url="injected")
        n = self.body.readinto(memoryview(b)[: self.after - self.seen])
        self.seen += n
        return n

    def close(self) -> None:
        self.body.close()


@pytest.mark.integration
def test_real_client_retries_a_body_broken_midway(s3_prefix, monkeypatch):
    make_client = Storage._make_client
    calls = []

    class Flaky:
        def __init__(self, client):
            self.client = client

        def get_object(self, **kw):
            resp = self.client.get_object(**kw)
            calls.append(kw["Range"])
            if len(calls) == 1:
                resp["Body"] = _BreaksAfter(resp["Body"], 2**20 + 1)
            return resp

    monkeypatch.setattr(Storage, "_make_client", lambda self: Flaky(make_client(self)))
    st = Storage(s3_prefix, retry=FAST)
    st.write_atomic("obj.bin", DATA)
    view, digest = st.read_verified("obj.bin", 10, SIZE)
    assert bytes(view) == DATA[10:] and digest == _sha(DATA[10:])
    assert calls == [f"bytes=10-{SIZE - 1}"] * 2
    assert st.io_counters() == {"requests": 2, "bytes": 2**20 + 1 + SIZE - 10}


class _TruncatingServer:
    """A minimal S3-ish endpoint serving DATA for any GET (206 + Content-Range); its first
    `failures` answers promise the whole range but close the connection halfway."""

    def __init__(self, failures: int):
        self.failures, self.requests = failures, 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):  # noqa: N802 - http.server's name
                a, b = (int(v) for v in self.headers["Range"].removeprefix("bytes=").split("-"))
                body = DATA[a:b + 1]
                server.requests += 1
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {a}-{a + len(body) - 1}/{SIZE}")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if server.requests <= server.failures:
                    self.wfile.write(body[: len(body) // 2])
                    self.close_connection = True
                    return
                self.wfile.write(body)

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.http.server_address[1]}"

    def __enter__(self) -> "_TruncatingServer":
        threading.Thread(target=self.http.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.http.shutdown()
        self.http.server_close()


@pytest.mark.integration
def test_a_connection_closed_mid_body_is_retried(monkeypatch):
    for key, value in FAKE_ENV.items():
        monkeypatch.setenv(key, value)
    with _TruncatingServer(failures=1) as server:
        st = Storage(f"s3://{BUCKET}/p", endpoint_url=server.url, retry=FAST)
        view, digest = st.read_verified("obj.bin", 3, SIZE - 3)
    assert bytes(view) == DATA[3:-3] and digest == _sha(DATA[3:-3])
    assert server.requests == 2 and st.io_counters() == {"requests": 2, "bytes": (SIZE - 6) // 2 + SIZE - 6}


@pytest.mark.integration
def test_throttling_is_retried(moto_endpoint, s3_env):
    prefix = f"s3://{BUCKET}/{uuid.uuid4().hex[:12]}"
    Storage(prefix).write_atomic("obj.bin", DATA)
    with FlakyProxy(moto_endpoint, failures=2) as proxy:  # 503 SlowDown twice
        st = Storage(prefix, endpoint_url=proxy.url, retry=FAST)
        view, digest = st.read_verified("obj.bin", 0, 2**20)
    assert digest == _sha(DATA[: 2**20]) and proxy.requests == 3
    assert st.io_counters() == {"requests": 3, "bytes": 2**20}


@pytest.mark.integration
def test_rejected_credentials_raise_auth_error_at_once(s3_prefix):
    from moto.core.authorization import enable_iam_authentication

    st = Storage(s3_prefix, retry=FAST)
    st.write_atomic("obj.bin", DATA)
    with enable_iam_authentication():  # the fake key 'testing' is unknown to moto's IAM from here on
        with pytest.raises(StorageAuthError, match=re.escape(st.url("obj.bin")) + ": access denied"):
            st.read_verified("obj.bin", 0, 10)
    assert st.io_counters()["requests"] == 1  # not retried


@pytest.mark.integration
def test_storage_options_credentials_are_used(s3_prefix, moto_endpoint):
    """key/secret in storage_options reach the botocore client as they reach s3fs; an option only
    s3fs understands sends the reads through s3fs instead."""
    import boto3
    from moto.core.authorization import enable_iam_authentication

    Storage(s3_prefix).write_atomic("obj.bin", DATA)
    iam = boto3.client("iam", endpoint_url=moto_endpoint, region_name="us-east-1")
    user = f"reader-{uuid.uuid4().hex[:8]}"
    iam.create_user(UserName=user)
    iam.put_user_policy(UserName=user, PolicyName="s3", PolicyDocument='{"Version": "2012-10-17", "Statement": '
                        '[{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}')
    key = iam.create_access_key(UserName=user)["AccessKey"]
    good = {"key": key["AccessKeyId"], "secret": key["SecretAccessKey"]}
    with enable_iam_authentication():  # the environment's key 'testing' is refused from here on
        st = Storage(s3_prefix, retry=FAST, storage_options=good)
        view, digest = st.read_verified("obj.bin", 5, 500)
        assert bytes(view) == DATA[5:500] and digest == _sha(DATA[5:500])
        fallback = Storage(s3_prefix, retry=FAST, storage_options={**good, "default_block_size": 2**20})
        view, digest = fallback.read_verified("obj.bin", 5, 500)
        assert bytes(view) == DATA[5:500] and digest == _sha(DATA[5:500])
        assert fallback.io_counters() == {"requests": 1, "bytes": 495}
        assert st._client is not None and fallback._client is None  # botocore, then s3fs
        wrong = Storage(s3_prefix, retry=FAST, storage_options={**good, "secret": "wrong"})
        with pytest.raises(StorageAuthError):
            wrong.read_verified("obj.bin", 0, 5)


@pytest.mark.integration
def test_a_forked_child_counts_from_zero_even_if_a_thread_held_the_lock(tmp_path):
    st = Storage(str(tmp_path))
    st.write_atomic("obj.bin", DATA[:100])
    st.read_verified("obj.bin", 0, 100)
    r, w = os.pipe()
    with st._io._lock:  # another thread mid-update when the process forks
        pid = os.fork()
        if pid == 0:
            try:
                before = st.io_counters()
                st.read_verified("obj.bin", 0, 10)
                os.write(w, repr((before, st.io_counters())).encode())
            finally:
                os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        got = f.read()
    os.waitpid(pid, 0)
    assert got == repr(({"requests": 0, "bytes": 0}, {"requests": 1, "bytes": 10}))
    assert st.io_counters() == {"requests": 1, "bytes": 100}
