"""Test helpers: synthetic datasets whose records carry their own id, and a flaky HTTP proxy."""

from __future__ import annotations

import http.client
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

import numpy as np

from advflow.platform.data.shards import Manifest, RecordSpec, encode_shard, shard_name, write_manifest
from advflow.platform.data.storage import Storage


def make_dataset(
    prefix: str,
    n: int = 300,
    *,
    shape: tuple[int, int, int] = (2, 3, 3),
    num_classes: int = 7,
    shard_records: int = 50,
    chunk_records: int = 16,
    dtype: str = "float32",
    seed: int = 0,
    mutate=None,
) -> tuple[Storage, Manifest]:
    """Write n records in shards; record k has x[0, 0, 0] == k (its id) and y == k % num_classes.
    mutate(x, y, ids) may edit a shard's arrays in place before it is written (bad-data tests);
    checksums are computed after it, so they match. Returns the storage and the manifest (written
    last, as prepare does)."""
    storage = Storage(prefix)
    spec = RecordSpec(shape, dtype)
    rng = np.random.default_rng(seed)
    shards = []
    for s, a in enumerate(range(0, n, shard_records)):
        ids = np.arange(a, min(a + shard_records, n))
        x = rng.standard_normal((len(ids), *shape)).astype(np.float32)
        x[:, 0, 0, 0] = ids
        y = ids % num_classes
        if mutate is not None:
            mutate(x, y, ids)
        data, info = encode_shard(x, y, spec, chunk_records, shard_name(s))
        storage.write_atomic(info.name, data)
        shards.append(info)
    m = Manifest(record=spec, chunk_records=chunk_records, shards=shards, num_classes=num_classes,
                 encoder={"name": "pixel", "scaling_factor": 1.0}, channel_mean=[0.0] * shape[0],
                 channel_std=[1.0] * shape[0], params={"synthetic": True})
    write_manifest(storage, m)
    return storage, m


def ids_of(x) -> list[int]:
    """Record ids of a batch made by make_dataset."""
    return [int(round(float(v))) for v in x[:, 0, 0, 0]]


class FlakyProxy:
    """HTTP proxy on 127.0.0.1 that answers the first `failures` requests with `status` (an S3-style
    error body) and forwards the rest to `target`. Used to test retries end to end."""

    def __init__(self, target: str, failures: int, status: int = 503, code: str = "SlowDown"):
        self.target = urlparse(target)
        self.remaining = failures
        self.requests = 0
        self.lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep test output quiet
                pass

            def _handle(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with proxy.lock:
                    proxy.requests += 1
                    fail = proxy.remaining > 0
                    proxy.remaining -= fail
                if fail:
                    err = (f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{code}</Code>"
                           f"<Message>injected</Message></Error>").encode()
                    self.send_response(status)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(err)))
                    self.end_headers()
                    self.wfile.write(err)
                    return
                conn = http.client.HTTPConnection(proxy.target.hostname, proxy.target.port, timeout=30)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
                headers["Host"] = self.headers.get("Host", "")
                conn.request(self.command, self.path, body=body or None, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "FlakyProxy":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
