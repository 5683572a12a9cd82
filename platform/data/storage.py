"""Byte-level access to a dataset prefix on S3 (or any S3-compatible endpoint) or a local directory.

One class, `Storage`, rooted at a prefix (`s3://bucket/path` or `/local/dir`). Everything above it
(shards, manifest, reader, prepare) talks bytes and object names relative to that prefix, so the same
code runs against AWS S3, MinIO, a test endpoint on 127.0.0.1, or a local disk.

Failure policy (why it is here and not in botocore/s3fs):
- botocore and s3fs each have their own retry loops; stacked, they multiply the time a dead endpoint
  takes to fail. Both are switched off (one attempt each) and this module runs the only retry loop,
  so the worst case is bounded and computable: `RetryPolicy.worst_case_seconds()`.
- Transient errors (timeouts, connection resets/refusals, HTTP 5xx, throttling) are retried with
  exponential backoff and jitter, then raise `StorageUnavailableError` naming the URI and endpoint.
- Rejected credentials raise `StorageAuthError` at once (retrying cannot fix them); a missing object
  raises `FileNotFoundError` naming the URI.

Endpoint override: `endpoint_url=` or the standard `AWS_ENDPOINT_URL_S3` / `AWS_ENDPOINT_URL`
variables, exactly as the AWS SDKs read them.

Two S3 clients: s3fs (aiobotocore) for listing, writing and `read`, and a plain botocore client for
`read_verified`, the reader's hot path: a range GET streamed into a preallocated buffer and hashed
piece by piece as it arrives. Against a local S3 server (jobs/bench/profile_reader.py) that costs
~1.1 client CPU-ms per MB, sha256's ~0.6 included, where s3fs's `cat_file` (aiohttp's small pieces
through its event loop, then a join) plus hashlib costs ~1.4.

I/O accounting: `io_counters()` counts requests (each GET or file read attempt, retries included)
and the bytes received, per process.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import socket
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

import fsspec

from advflow.platform.atomic import write_bytes

T = TypeVar("T")


class StorageError(OSError):
    """Base class for storage failures; the message always names the URI."""


class StorageUnavailableError(StorageError):
    """The endpoint stayed unreachable / kept failing after every retry."""


class StorageAuthError(StorageError):
    """The endpoint rejected the credentials or denied access."""


@dataclass(frozen=True)
class RetryPolicy:
    """How hard to try before declaring the store down.

    attempts: total tries per operation (1 = no retry).
    backoff_initial / backoff_max: seconds; the wait before retry k is
        min(backoff_max, backoff_initial * 2**k) scaled by a jitter in [0.5, 1].
    connect_timeout / read_timeout: seconds, handed to botocore for each HTTP request.
    """

    attempts: int = 5
    backoff_initial: float = 0.25
    backoff_max: float = 8.0
    connect_timeout: float = 10.0
    read_timeout: float = 60.0

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError(f"RetryPolicy.attempts must be >= 1, got {self.attempts}")
        for name in ("backoff_initial", "backoff_max", "connect_timeout", "read_timeout"):
            if getattr(self, name) <= 0:
                raise ValueError(f"RetryPolicy.{name} must be > 0, got {getattr(self, name)}")

    def delay(self, attempt: int) -> float:
        """Wait in seconds after failed try number `attempt` (0-based)."""
        base = min(self.backoff_max, self.backoff_initial * (2 ** attempt))
        return base * random.uniform(0.5, 1.0)

    def worst_case_seconds(self) -> float:
        """Upper bound on the time one operation can take before it fails (per-request timeouts
        plus all backoff waits); what 'bounded failure' means in numbers."""
        per_try = self.connect_timeout + self.read_timeout
        waits = sum(min(self.backoff_max, self.backoff_initial * 2 ** k) for k in range(self.attempts - 1))
        return self.attempts * per_try + waits


# Error codes S3 (and compatible stores) use for throttling or server-side trouble.
_TRANSIENT_CODES = {
    "SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "RequestTimeTooSkewed",
    "InternalError", "ServiceUnavailable", "RequestLimitExceeded", "TooManyRequests",
    "BandwidthLimitExceeded", "EC2ThrottledException", "PriorRequestNotComplete",
}
_AUTH_CODES = {
    "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken",
    "InvalidToken", "TokenRefreshRequired", "AccountProblem", "AllAccessDisabled",
    "InvalidClientTokenId", "UnrecognizedClientException", "AuthFailure",
}
_MISSING_CODES = {"NoSuchKey", "NoSuchBucket", "404", "NotFound"}


def _chain(exc: BaseException) -> list[BaseException]:
    """The exception and its causes/contexts (s3fs re-raises botocore errors as OSError)."""
    out: list[BaseException] = []
    cur: BaseException | None = exc
    while cur is not None and cur not in out and len(out) < 10:
        out.append(cur)
        cur = cur.__cause__ or cur.__context__
    return out


def classify_error(exc: BaseException) -> str:
    """Map an exception from fsspec/s3fs/botocore to 'transient', 'auth', 'missing' or 'fatal'."""
    try:
        from botocore import exceptions as bexc
    except ImportError:  # local-only installs
        bexc = None
    for e in _chain(exc):
        if bexc is not None and isinstance(e, bexc.ClientError):
            err = e.response.get("Error", {}) if isinstance(e.response, dict) else {}
            code = str(err.get("Code", ""))
            status = int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
            if code in _AUTH_CODES or status in (401, 403):
                return "auth"
            if code in _MISSING_CODES or status == 404:
                return "missing"
            if code in _TRANSIENT_CODES or status == 429 or status >= 500:
                return "transient"
            return "fatal"
        if bexc is not None and isinstance(
            e, (bexc.NoCredentialsError, bexc.PartialCredentialsError)
        ):
            return "auth"
        if bexc is not None and isinstance(
            e,
            (
                bexc.ConnectTimeoutError, bexc.ReadTimeoutError, bexc.EndpointConnectionError,
                bexc.ConnectionClosedError, bexc.HTTPClientError, bexc.ResponseStreamingError,
                bexc.IncompleteReadError,
            ),
        ):
            return "transient"
        if isinstance(e, (socket.timeout, TimeoutError, asyncio.TimeoutError, ConnectionError)):
            return "transient"
        name = type(e).__name__
        # aiohttp / fsspec types matched by name so this module does not import aiohttp.
        if name in {"FSTimeoutError", "ClientPayloadError", "ServerDisconnectedError",
                    "ClientConnectorError", "ClientOSError", "ServerTimeoutError"}:
            return "transient"
    for e in _chain(exc):
        if isinstance(e, PermissionError):
            return "auth"
        if isinstance(e, FileNotFoundError):
            return "missing"
    return "fatal"


_SESSIONS: dict[tuple, Any] = {}
# What a session's credential chain reads from the environment. A session caches the credentials it
# first resolved, so one is shared only while these stay the same: a process that switches keys
# (a new `advflow stack env`, another profile) gets a new session instead of the stale keys.
_CREDENTIAL_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                   "AWS_DEFAULT_PROFILE", "AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE", "AWS_REGION",
                   "AWS_DEFAULT_REGION", "AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE")


def _shared_session(kind: str = "aiobotocore") -> Any:
    """One aiobotocore (s3fs) or botocore session per process and credential environment: building
    a session reloads botocore's service models (~0.1-0.3 s), which would otherwise be paid by every
    Storage / DataLoader worker / test."""
    key = (kind, os.getpid(), *(os.environ.get(name) for name in _CREDENTIAL_ENV))
    if key not in _SESSIONS:
        if any(k[1] != key[1] for k in _SESSIONS):
            _SESSIONS.clear()  # a forked child does not reuse its parent's sessions
        if kind == "aiobotocore":
            from aiobotocore.session import AioSession

            _SESSIONS[key] = AioSession()
        else:
            import botocore.session

            _SESSIONS[key] = botocore.session.Session()
    return _SESSIONS[key]


# storage_options that the botocore client of `read_verified` understands, as s3fs reads them; any
# other option keeps that Storage's reads on s3fs, which does understand it.
_BOTOCORE_OPTIONS = frozenset({"key", "secret", "token", "anon", "use_ssl", "client_kwargs", "config_kwargs"})
# Bytes per readinto of a streamed GET body: large enough that per-piece Python overhead is noise,
# small enough that hashing overlaps the transfer.
_PIECE = 1 << 20
# Guards botocore client creation: a botocore session is not thread-safe, and the reader's I/O
# threads may all make their first read at once. Replaced in a forked child (see _after_fork).
_CLIENT_LOCK = threading.Lock()


class _IOCounters:
    """Requests made and bytes received, thread-safe. Each process counts its own: a pickled copy
    and a forked child start from zero."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests = 0
        self.bytes = 0
        _LIVE_COUNTERS.add(self)

    def add(self, requests: int, nbytes: int) -> None:
        with self._lock:
            self.requests += requests
            self.bytes += nbytes

    def reset(self) -> None:
        with self._lock:
            self.requests = self.bytes = 0

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return {"requests": self.requests, "bytes": self.bytes}

    def __reduce__(self) -> tuple:
        return (_IOCounters, ())


_LIVE_COUNTERS: "weakref.WeakSet[_IOCounters]" = weakref.WeakSet()


def _after_fork() -> None:
    """In a forked child no other thread survives, so locks they held would never be released."""
    global _CLIENT_LOCK
    _CLIENT_LOCK = threading.Lock()
    for counters in list(_LIVE_COUNTERS):
        counters._lock = threading.Lock()
        counters.requests = counters.bytes = 0


os.register_at_fork(after_in_child=_after_fork)


def resolve_endpoint(endpoint_url: str | None) -> str | None:
    """Explicit endpoint, else the standard AWS environment overrides, else None (AWS S3)."""
    return endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


class Storage:
    """Named objects under one prefix. Names are relative ('shard-00000.bin', 'manifest.json').

    uri: `s3://bucket/prefix` or a local directory (created on first write).
    endpoint_url: S3 endpoint override (default: AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL / AWS).
    retry: the retry / timeout policy for every operation.
    storage_options: extra keyword arguments for the fsspec filesystem (e.g. key/secret, anon).
    """

    def __init__(
        self,
        uri: str,
        *,
        endpoint_url: str | None = None,
        retry: RetryPolicy | None = None,
        storage_options: dict[str, Any] | None = None,
    ) -> None:
        if not uri:
            raise ValueError("storage uri is empty: pass s3://bucket/prefix or a local directory")
        self.retry = retry or RetryPolicy()
        self.storage_options = dict(storage_options or {})
        protocol, _, rest = uri.partition("://")
        if not rest:
            protocol, rest = "file", uri
        if protocol in ("s3", "s3a"):
            self.protocol = "s3"
            self.root = rest.strip("/")
            if not self.root:
                raise ValueError(f"storage uri {uri!r} has no bucket: use s3://bucket/prefix")
            self.endpoint_url = resolve_endpoint(endpoint_url)
        elif protocol == "file":
            self.protocol = "file"
            self.root = os.path.abspath(os.path.expanduser(rest)).rstrip("/") or "/"
            self.endpoint_url = None
        else:
            raise ValueError(f"storage uri {uri!r}: unsupported scheme {protocol!r} (use s3:// or a local path)")
        self.uri = f"s3://{self.root}" if self.protocol == "s3" else self.root
        self._fs: fsspec.AbstractFileSystem | None = None
        self._pid = -1
        self._s3: Any = None  # botocore client of read_verified (None: s3fs fallback)
        self._s3_pid = -1
        self._io = _IOCounters()

    # -- plumbing -------------------------------------------------------------------------------
    @property
    def is_remote(self) -> bool:
        return self.protocol == "s3"

    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        # s3fs instances are not fork-safe (its event loop belongs to the parent), so every process
        # (e.g. a DataLoader worker) builds its own.
        if self._fs is None or self._pid != os.getpid():
            self._fs = self._make_fs()
            self._pid = os.getpid()
        return self._fs

    def _make_fs(self) -> fsspec.AbstractFileSystem:
        if self.protocol == "file":
            return fsspec.filesystem("file")
        import s3fs  # imported lazily: local-only use needs no AWS stack

        opts = dict(self.storage_options)
        opts.pop("config_kwargs", None)
        opts.setdefault("session", _shared_session())
        fs = s3fs.S3FileSystem(
            endpoint_url=self.endpoint_url,
            config_kwargs=self._config_kwargs(),
            skip_instance_cache=True,
            use_listings_cache=False,
            **opts,
        )
        fs.retries = 1  # s3fs's own retry loop off, same reason
        return fs

    def _config_kwargs(self) -> dict[str, Any]:
        """botocore Config options of both S3 clients: storage_options' config_kwargs over ours."""
        config = dict(self.storage_options.get("config_kwargs") or {})
        config.setdefault("connect_timeout", self.retry.connect_timeout)
        config.setdefault("read_timeout", self.retry.read_timeout)
        # One attempt inside botocore: our loop is the only retry layer (bounded, see module doc).
        config.setdefault("retries", {"total_max_attempts": 1, "mode": "standard"})
        # botocore >= 1.36 validates a CRC32 of every GET body by default (on s3fs's single event
        # loop thread it became the reader's bottleneck). Every byte the reader uses is already
        # checked against the manifest's sha256, so response validation is left to that.
        config.setdefault("response_checksum_validation", "when_required")
        return config

    @property
    def _client(self) -> Any:
        """This process's botocore S3 client (thread-safe, shared by the reader's I/O threads), or
        None when storage_options name something only s3fs understands. Rebuilt per process, like `fs`."""
        if self._s3_pid != os.getpid():
            with _CLIENT_LOCK:
                if self._s3_pid != os.getpid():
                    self._s3 = self._make_client()
                    self._s3_pid = os.getpid()
        return self._s3

    def _make_client(self) -> Any:
        """The botocore equivalent of `_make_fs`'s s3fs client: same endpoint, timeouts, retry and
        checksum settings, and storage_options mapped as s3fs maps them."""
        opts = self.storage_options
        if not set(opts) <= _BOTOCORE_OPTIONS:
            return None
        from botocore.config import Config

        config = self._config_kwargs()
        config.setdefault("max_pool_connections", 32)  # >= the reader's I/O threads: no reconnects
        kwargs = {
            "aws_access_key_id": opts.get("key"), "aws_secret_access_key": opts.get("secret"),
            "aws_session_token": opts.get("token"), "endpoint_url": self.endpoint_url,
            "use_ssl": opts.get("use_ssl", True),
        }  # fmt: skip
        kwargs = {k: v for k, v in kwargs.items() if v is not None}
        kwargs.update(opts.get("client_kwargs") or {})
        if opts.get("anon"):
            from botocore import UNSIGNED

            for k in ("aws_access_key_id", "aws_secret_access_key", "aws_session_token"):
                kwargs.pop(k, None)
            config["signature_version"] = UNSIGNED
        return _shared_session("botocore").create_client("s3", config=Config(**config), **kwargs)

    def path(self, name: str) -> str:
        """Filesystem path of `name` (no scheme) for fsspec calls."""
        return f"{self.root}/{name}" if name else self.root

    def url(self, name: str = "") -> str:
        """Full URI of `name`, for messages and for users."""
        return f"{self.uri}/{name}" if name else self.uri

    def _where(self) -> str:
        return f" (endpoint {self.endpoint_url})" if self.endpoint_url else ""

    def call(self, what: str, name: str, fn: Callable[[], T]) -> T:
        """Run `fn` with the retry policy; `what`/`name` only label the error message."""
        uri = self.url(name)
        last: BaseException | None = None
        for attempt in range(self.retry.attempts):
            try:
                return fn()
            except Exception as exc:  # noqa: BLE001 - classified below, never swallowed
                kind = classify_error(exc)
                if kind == "missing":
                    raise FileNotFoundError(f"{uri}: not found ({what}){self._where()}") from exc
                if kind == "auth":
                    raise StorageAuthError(
                        f"{uri}: access denied or credentials rejected during {what}{self._where()}: "
                        f"{exc}. Check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or the profile) "
                        "and the bucket policy."
                    ) from exc
                if kind != "transient":
                    raise
                last = exc
                if attempt + 1 < self.retry.attempts:
                    time.sleep(self.retry.delay(attempt))
        raise StorageUnavailableError(
            f"{uri}: {what} failed after {self.retry.attempts} attempts{self._where()}; the store "
            f"looks unreachable or overloaded. Last error: {type(last).__name__}: {last}"
        ) from last

    # -- operations -----------------------------------------------------------------------------
    def read(self, name: str, start: int | None = None, end: int | None = None) -> bytes:
        """Bytes [start, end) of object `name` (whole object when both are None). May return fewer
        bytes than asked for when the object is shorter; callers check lengths."""
        p = self.path(name)

        def _cat() -> bytes:
            data = b""
            try:
                data = self.fs.cat_file(p, start=start, end=end)
            finally:
                self._io.add(1, len(data))
            return data

        return self.call("read", name, _cat)

    def read_verified(self, name: str, start: int, end: int) -> tuple[memoryview, str]:
        """Bytes [start, end) of object `name` and the sha256 hexdigest of exactly those bytes, for
        callers that check chunks against a manifest (the caller compares the digest).

        Cheaper than `read` + hashlib: the body lands in one preallocated buffer (no join copy) and
        is hashed piece by piece as it arrives; a retry starts both over. numpy.frombuffer uses the
        view without a copy (it is writable, except on the s3fs fallback). Like `read`, it is
        shorter when the object is (empty when the object ends at or before `start`); callers
        check the length."""
        if not 0 <= start <= end:
            raise ValueError(f"{self.url(name)}: bad byte range [{start}, {end})")
        if start == end:
            return memoryview(b""), hashlib.sha256().hexdigest()
        if self.protocol == "s3" and self._client is None:  # storage_options only s3fs understands
            data = self.read(name, start, end)
            return memoryview(data), hashlib.sha256(data).hexdigest()
        buf = bytearray(end - start)
        fill = self._read_local_into if self.protocol == "file" else self._get_into
        n, digest = self.call("read", name, lambda: fill(name, start, buf))
        return memoryview(buf)[:n], digest

    def _read_local_into(self, name: str, start: int, buf: bytearray) -> tuple[int, str]:
        """One attempt: file bytes from `start` into `buf` (unbuffered readinto: no intermediate
        copy), then one sha256 over them (hashlib releases the GIL for large buffers)."""
        view, n = memoryview(buf), 0
        try:
            with open(self.path(name), "rb", buffering=0) as f:
                f.seek(start)
                while n < len(buf):
                    got = f.readinto(view[n:])
                    if not got:
                        break
                    n += got
        finally:
            self._io.add(1, n)
        return n, hashlib.sha256(view[:n]).hexdigest()

    def _get_into(self, name: str, start: int, buf: bytearray) -> tuple[int, str]:
        """One attempt: a range GET streamed into `buf` from its start with a fresh hasher. Errors
        mid-body (timeouts, resets, a body shorter than its Content-Length) surface as botocore
        exceptions that `classify_error` calls transient."""
        from botocore.exceptions import ClientError

        bucket, _, key = self.path(name).partition("/")
        view, n, hasher = memoryview(buf), 0, hashlib.sha256()
        try:
            try:
                rng = f"bytes={start}-{start + len(buf) - 1}"
                resp = self._client.get_object(Bucket=bucket, Key=key, Range=rng)
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") == "InvalidRange":  # starts at or past the end
                    return 0, hasher.hexdigest()
                raise
            body = resp["Body"]
            try:
                while n < len(buf):
                    got = body.readinto(view[n:n + _PIECE])
                    if not got:
                        break
                    hasher.update(view[n:n + got])
                    n += got
            finally:
                body.close()  # after a complete body the connection is back in the pool already
        finally:
            self._io.add(1, n)
        return n, hasher.hexdigest()

    def io_counters(self) -> dict[str, int]:
        """{"requests": GET / file read attempts (retries included), "bytes": bytes received} by
        `read` and `read_verified` in this process since construction, unpickling or the last reset.
        A failed attempt's partial body counts where it is seen (read_verified). A whole-object
        `read` on S3 counts as one request, though s3fs first HEADs the object and splits one larger
        than its block size (50 MiB) into parallel range GETs."""
        return self._io.snapshot()

    def reset_io_counters(self) -> None:
        self._io.reset()

    def write_atomic(self, name: str, data: bytes) -> None:
        """Write `data` so that readers see either the old object or the complete new one, never a
        prefix of it: local files go to a temp file in the same directory and are os.replace'd;
        S3 objects appear only when their (single or multipart) PUT completes."""
        if self.protocol == "file":
            self.call("write", name, lambda: self._write_local(name, data))
        else:
            p = self.path(name)
            self.call("write", name, lambda: self.fs.pipe_file(p, data))

    def _write_local(self, name: str, data: bytes) -> None:
        write_bytes(self.path(name), data)  # 0644: mkstemp's 0600 would hide the dataset from other users

    def size(self, name: str) -> int:
        p = self.path(name)
        return int(self.call("stat", name, lambda: self.fs.size(p)))

    def exists(self, name: str) -> bool:
        p = self.path(name)
        return bool(self.call("stat", name, lambda: self.fs.exists(p)))

    def list_sizes(self, subdir: str = "") -> dict[str, int]:
        """{relative name: size} of the plain objects directly under the prefix (or `subdir`)."""
        p = self.path(subdir)

        def _ls() -> list[dict[str, Any]]:
            if self.protocol == "file" and not os.path.isdir(p):
                return []
            try:
                return self.fs.ls(p, detail=True, refresh=True) if self.is_remote else self.fs.ls(p, detail=True)
            except FileNotFoundError:
                return []

        entries = self.call("list", subdir, _ls)
        out: dict[str, int] = {}
        for e in entries:
            if e.get("type") != "file":
                continue
            base = e["name"].rstrip("/").rsplit("/", 1)[-1]
            out[base] = int(e.get("size") or 0)
        return out

    def list_tree(self) -> list[str]:
        """The relative names of every file below the prefix, at any depth (one recursive listing)."""
        base = self.path("").rstrip("/") + "/"
        found = self.call("list", "", lambda: self.fs.find(self.path(""), withdirs=False))
        return sorted(str(p)[len(base):] for p in found if str(p).startswith(base))

    def remove(self, name: str) -> None:
        p = self.path(name)

        def _rm() -> None:
            try:
                self.fs.rm_file(p)
            except FileNotFoundError:
                pass

        self.call("delete", name, _rm)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_fs"], state["_pid"] = None, -1  # rebuilt in the receiving process
        state["_s3"], state["_s3_pid"] = None, -1
        return state

    def __repr__(self) -> str:
        return f"Storage({self.uri!r}{self._where()})"
