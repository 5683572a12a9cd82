"""The stack's S3 endpoint: moto's S3 server with every bucket written through to a disk directory.

moto keeps objects in memory, so on its own a stopped (or killed) server loses every dataset,
checkpoint and MLflow artifact. Here each request that changes what a client can read (PutObject,
CopyObject, CompleteMultipartUpload, DeleteObject(s), CreateBucket, DeleteBucket) is answered only
after the change is on disk: the object's bytes and then its metadata file are written atomically
(temp file, fsync, rename, fsync of the folder). A machine that dies right after a 200 has the
object; one that dies before it has the old version, never a torn one. At start-up the directory is
loaded back into moto before the port opens, so a client never sees a half-restored store.

Why not moto's own recorder (MOTO_ENABLE_RECORDING): it appends every request (bodies base64) to a
file that only grows, including overwritten and deleted data, and its replay re-sends multipart
uploads with upload ids the new server never issued, so every object larger than the client's
multipart threshold (checkpoints, shards) is gone after a replay.

Layout (``--data-dir``, the stack uses ``<state dir>/s3``)::

    store.json                                  format and a random id (MLflow's db is bound to it)
    buckets/<bucket>/bucket.json                name, region
    buckets/<bucket>/<h[:2]>/<h>.json           key, etag, size, last modified, metadata, data file
    buckets/<bucket>/<h[:2]>/<h>.<nonce>.data   the bytes

``h`` is the SHA-256 of the key, so any S3 key (``a`` and ``a/b`` side by side, ``..``, 1024 bytes)
maps to a valid file name. The metadata file is the commit point: it names its data file, and a
data file no metadata file names is a leftover of a crash, removed at the next start.

Kept: buckets (and their region), objects with their user metadata (``x-amz-meta-*``), content
type/encoding/disposition/language, cache control, expiry, ETag and last-modified time. Not kept:
versions (only the latest is stored), tags, ACLs, policies, lifecycle, CORS and other bucket
settings, and unfinished multipart uploads; a request that sets one of them is served, and the
server's log says it will not survive a restart. ``POST /moto-api/reset`` is refused: it would
empty memory while the disk keeps everything.

Every request must be signed (AWS SigV4) with the key in ``--credentials-file``
(``advflow.infra.local.s3_auth``); others get 403 before moto or the disk sees them.

Run: ``python -m advflow.infra.local.s3_store (--data-dir DIR | --memory) --credentials-file FILE
[--host 127.0.0.1] [--port 29000]``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from advflow.platform.atomic import write_bytes, write_text

FORMAT = 1
STORE_FILE = "store.json"
_BUCKETS = "buckets"
_BUCKET_FILE = "bucket.json"

# Query parameters of requests that change no object a client can list or read (multipart parts,
# starting or aborting an upload): nothing to write through.
_PART_ONLY = {("PUT", "partNumber"), ("POST", "uploads"), ("DELETE", "uploadId")}
# Sub-resources this store does not keep. Requests that set them still work on the live server.
_NOT_KEPT = (
    "tagging", "acl", "versioning", "lifecycle", "policy", "cors", "encryption", "website",
    "object-lock", "retention", "legal-hold", "notification", "replication", "ownershipControls",
    "logging", "publicAccessBlock", "accelerate", "requestPayment", "intelligent-tiering",
    "analytics", "inventory", "metrics",
)  # fmt: skip

Signature = tuple[str, int, str]  # (etag without quotes, size, last modified ISO 8601 UTC)


def _log(message: str) -> None:
    print(f"[s3-store] {message}", flush=True)


def _fsync_dir(path: Path) -> None:
    """Make renames and unlinks in ``path`` durable (the file's own fsync does not cover them)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _iso(when: dt.datetime) -> str:
    if when.tzinfo is None:  # moto keeps naive UTC datetimes
        when = when.replace(tzinfo=dt.timezone.utc)
    return when.astimezone(dt.timezone.utc).isoformat()


@dataclass
class StoredObject:
    bucket: str
    key: str
    etag: str
    size: int
    last_modified: str
    metadata: dict[str, str]
    data_path: Path

    @property
    def signature(self) -> Signature:
        return (self.etag, self.size, self.last_modified)


def store_id(root: Path) -> str | None:
    """The id in ``root/store.json``, or None when there is no store there yet."""
    try:
        return str(json.loads((Path(root) / STORE_FILE).read_text())["id"])
    except FileNotFoundError:
        return None
    except (ValueError, KeyError) as exc:
        raise RuntimeError(
            f"{Path(root) / STORE_FILE} is damaged ({exc}); move the folder {root} aside to start "
            "an empty store"
        ) from exc


def ensure_store(root: Path) -> str:
    """Create an empty store in ``root`` unless one is there; return its id."""
    root = Path(root)
    found = store_id(root)
    if found is not None:
        return found
    new_id = uuid.uuid4().hex
    (root / _BUCKETS).mkdir(parents=True, exist_ok=True)
    record = {"format": FORMAT, "id": new_id, "created": _iso(dt.datetime.now(dt.timezone.utc))}
    write_text(root / STORE_FILE, json.dumps(record, indent=2) + "\n")
    _fsync_dir(root)
    return new_id


def store_stats(root: Path) -> tuple[int, int, int]:
    """(buckets, objects, bytes) on disk, from file names and sizes only (no file is opened)."""
    buckets = objects = size = 0
    base = Path(root) / _BUCKETS
    if not base.is_dir():
        return 0, 0, 0
    for bucket_dir in base.iterdir():
        if not (bucket_dir / _BUCKET_FILE).exists():
            continue
        buckets += 1
        for sub in bucket_dir.iterdir():
            if not sub.is_dir():
                continue
            for entry in os.scandir(sub):
                if entry.name.endswith(".json"):
                    objects += 1
                elif entry.name.endswith(".data"):
                    size += entry.stat().st_size
    return buckets, objects, size


class DiskStore:
    """The on-disk side: buckets and objects under ``root`` (see the module docstring)."""

    def __init__(self, root: Path):
        self.root = Path(root).resolve()
        self.id = ensure_store(self.root)
        # What is on disk, for cheap comparisons: bucket -> key -> signature.
        self.index: dict[str, dict[str, Signature]] = {}
        self.regions: dict[str, str] = {}

    def _bucket_dir(self, bucket: str) -> Path:
        return self.root / _BUCKETS / bucket

    def _meta_path(self, bucket: str, key: str) -> Path:
        digest = hashlib.sha256(key.encode("utf-8")).hexdigest()
        return self._bucket_dir(bucket) / digest[:2] / f"{digest}.json"

    # ------------------------------------------------------------------------------ reading

    def load(self) -> Iterator[StoredObject]:
        """Every stored object, bucket by bucket; fills the index and removes crash leftovers."""
        base = self.root / _BUCKETS
        base.mkdir(parents=True, exist_ok=True)
        for bucket_dir in sorted(base.iterdir()):
            try:
                info = json.loads((bucket_dir / _BUCKET_FILE).read_text())
            except FileNotFoundError:
                continue  # a bucket whose creation did not finish, or whose deletion did
            name = info["name"]
            self.regions[name] = info.get("region", "us-east-1")
            self.index[name] = {}
            for sub in sorted(p for p in bucket_dir.iterdir() if p.is_dir()):
                referenced: set[str] = set()
                for meta_path in sorted(sub.glob("*.json")):
                    stored = self._read_meta(name, meta_path)
                    if stored is None:
                        continue
                    referenced.add(stored.data_path.name)
                    self.index[name][stored.key] = stored.signature
                    yield stored
                for leftover in sub.iterdir():
                    if leftover.name.endswith(".tmp") or (
                        leftover.name.endswith(".data") and leftover.name not in referenced
                    ):
                        leftover.unlink(missing_ok=True)

    def _read_meta(self, bucket: str, meta_path: Path) -> StoredObject | None:
        try:
            meta = json.loads(meta_path.read_text())
            data_path = meta_path.parent / meta["data"]
            stored = StoredObject(
                bucket=bucket,
                key=meta["key"],
                etag=meta["etag"],
                size=int(meta["size"]),
                last_modified=meta["last_modified"],
                metadata=dict(meta.get("metadata", {})),
                data_path=data_path,
            )
            actual = data_path.stat().st_size
        except (OSError, ValueError, KeyError) as exc:
            _log(f"WARNING: skipping {meta_path}: unreadable ({exc}); the object it described is lost")
            return None
        if actual != stored.size:
            _log(
                f"WARNING: skipping s3://{bucket}/{stored.key}: {stored.data_path} has {actual} bytes, "
                f"its metadata says {stored.size}"
            )
            return None
        return stored

    # ------------------------------------------------------------------------------ writing

    def put_bucket(self, bucket: str, region: str) -> None:
        if bucket in self.index and self.regions.get(bucket) == region:
            return
        bucket_dir = self._bucket_dir(bucket)
        bucket_dir.mkdir(parents=True, exist_ok=True)
        write_text(bucket_dir / _BUCKET_FILE, json.dumps({"name": bucket, "region": region}) + "\n")
        _fsync_dir(bucket_dir)
        _fsync_dir(bucket_dir.parent)
        self.index.setdefault(bucket, {})
        self.regions[bucket] = region

    def remove_bucket(self, bucket: str) -> None:
        for key in list(self.index.get(bucket, {})):
            self.delete_object(bucket, key)
        bucket_dir = self._bucket_dir(bucket)
        (bucket_dir / _BUCKET_FILE).unlink(missing_ok=True)  # the commit point of the removal
        if bucket_dir.exists():
            _fsync_dir(bucket_dir)
            for sub in bucket_dir.iterdir():
                if sub.is_dir():
                    for leftover in sub.iterdir():
                        leftover.unlink(missing_ok=True)
                    sub.rmdir()
            bucket_dir.rmdir()
            _fsync_dir(bucket_dir.parent)
        self.index.pop(bucket, None)
        self.regions.pop(bucket, None)

    def put_object(
        self, bucket: str, key: str, data: bytes, signature: Signature, metadata: dict[str, str]
    ) -> None:
        meta_path = self._meta_path(bucket, key)
        old_data = self._data_name(meta_path)
        data_name = f"{meta_path.stem}.{uuid.uuid4().hex[:12]}.data"
        # Bytes first under a fresh name, then the metadata naming them: until that rename the
        # old version stays complete and readable.
        write_bytes(meta_path.parent / data_name, data)
        etag, size, last_modified = signature
        record = {
            "key": key,
            "etag": etag,
            "size": size,
            "last_modified": last_modified,
            "metadata": metadata,
            "data": data_name,
        }
        write_text(meta_path, json.dumps(record) + "\n")
        _fsync_dir(meta_path.parent)
        if old_data and old_data != data_name:
            (meta_path.parent / old_data).unlink(missing_ok=True)
        self.index.setdefault(bucket, {})[key] = signature

    def delete_object(self, bucket: str, key: str) -> None:
        meta_path = self._meta_path(bucket, key)
        old_data = self._data_name(meta_path)
        meta_path.unlink(missing_ok=True)
        if meta_path.parent.exists():
            _fsync_dir(meta_path.parent)
        if old_data:
            (meta_path.parent / old_data).unlink(missing_ok=True)
        self.index.get(bucket, {}).pop(key, None)

    @staticmethod
    def _data_name(meta_path: Path) -> str | None:
        try:
            return json.loads(meta_path.read_text())["data"]
        except (OSError, ValueError, KeyError):
            return None


class MotoView:
    """The few parts of moto's in-process S3 backend this store reads and restores into.

    Kept in one place on purpose: these are moto internals (S3Backend, FakeBucket, FakeKey), and a
    moto upgrade that changes them breaks only this class (tests/test_stack.py covers every method).
    """

    def __init__(self) -> None:
        from moto.core import DEFAULT_ACCOUNT_ID
        from moto.s3.models import s3_backends

        self.backend = s3_backends[DEFAULT_ACCOUNT_ID]["aws"]

    def buckets(self) -> dict[str, str]:
        return {name: bucket.region_name for name, bucket in self.backend.buckets.items()}

    def keys(self, bucket: str) -> dict[str, Any]:
        """Latest version of every key (delete markers, i.e. deleted keys, left out)."""
        found = self.backend.buckets.get(bucket)
        if found is None:
            return {}
        return {name: key for name, key in found.keys.items() if hasattr(key, "value")}

    def key(self, bucket: str, name: str) -> Any | None:
        found = self.backend.buckets.get(bucket)
        key = found.keys.get(name) if found is not None else None
        return key if key is not None and hasattr(key, "value") else None

    @staticmethod
    def signature(key: Any) -> Signature:
        return (key.etag.strip('"'), int(key.size), _iso(key.last_modified))

    @staticmethod
    def metadata(key: Any) -> dict[str, str]:
        return {str(k): str(v) for k, v in key.metadata.items()}

    def restore_bucket(self, bucket: str, region: str) -> None:
        if bucket not in self.backend.buckets:
            self.backend.create_bucket(bucket, region)

    def restore_object(self, stored: StoredObject) -> None:
        key = self.backend.put_object(
            stored.bucket, stored.key, stored.data_path.read_bytes(), disable_notification=True
        )
        key.set_metadata(dict(stored.metadata))
        # The ETag of a multipart upload ("<md5>-<parts>") and the upload time are facts about the
        # original write; recomputing them would make restored objects look changed.
        key._etag = stored.etag
        key.last_modified = dt.datetime.fromisoformat(stored.last_modified).astimezone(
            dt.timezone.utc
        ).replace(tzinfo=None)


class WriteThrough:
    """WSGI middleware: after a changing request succeeds, write the change to disk, then answer.

    Changing requests run one at a time (a lock around moto's handling and the write), so the
    object read back for writing is exactly the one that request left, and no overwrite can free
    its buffer meanwhile. Reads (GET, HEAD, listings) and multipart parts are not serialised.
    """

    def __init__(self, app: Callable, store: DiskStore, view: MotoView):
        self.app = app
        self.store = store
        self.view = view
        self.lock = threading.Lock()
        self._warned: set[str] = set()

    def __call__(self, environ: dict[str, Any], start_response: Callable) -> Iterable[bytes]:
        method = environ.get("REQUEST_METHOD", "GET")
        path = environ.get("PATH_INFO", "")
        if path.startswith("/moto-api"):
            if "reset" in path and method == "POST":
                return _error(start_response, "409 Conflict", "ResetRefused",
                              "this S3 server keeps its buckets on disk in "
                              f"{self.store.root}; stop the stack and remove that folder instead")  # fmt: skip
            return self.app(environ, start_response)
        if method not in ("PUT", "POST", "DELETE"):
            return self.app(environ, start_response)
        query = parse_qs(environ.get("QUERY_STRING", ""), keep_blank_values=True)
        if any((method, name) in _PART_ONLY for name in query):
            return self.app(environ, start_response)
        for name in query:
            if name in _NOT_KEPT and name not in self._warned:
                self._warned.add(name)
                _log(
                    f"WARNING: {method} ?{name} is served, but this store does not keep {name} "
                    "settings on disk: they are gone after the next restart"
                )
        with self.lock:
            answer: list[Any] = []

            def capture(status: str, headers: list, exc_info: Any = None) -> Callable:
                answer[:] = [status, headers]
                return lambda _data: None  # the body comes back through the iterable

            result = self.app(environ, capture)
            try:
                body = b"".join(result)
            finally:
                getattr(result, "close", lambda: None)()
            status, headers = answer
            if int(status.split()[0]) < 300:
                try:
                    self.persist(environ, method, query)
                except OSError as exc:
                    _log(f"ERROR: could not write {method} {path} to {self.store.root}: {exc}")
                    return _error(start_response, "500 Internal Server Error", "InternalError",
                                  f"the change could not be written to disk: {exc}")  # fmt: skip
        start_response(status, headers)
        return [body]

    # ------------------------------------------------------------------------- persisting

    def persist(self, environ: dict[str, Any], method: str, query: dict[str, list[str]]) -> None:
        bucket, key = _target(environ)
        if bucket is None:
            self.sync_all()
        elif key is None or "delete" in query:
            self.sync_bucket(bucket)
        else:
            self.sync_key(bucket, key, method)

    def sync_all(self) -> None:
        for bucket in set(self.view.buckets()) | set(self.store.index):
            self.sync_bucket(bucket)

    def _ensure_bucket(self, bucket: str) -> bool:
        region = self.view.buckets().get(bucket)
        if region is None:
            if bucket in self.store.index:
                self.store.remove_bucket(bucket)
            return False
        self.store.put_bucket(bucket, region)
        return True

    def sync_bucket(self, bucket: str) -> None:
        if not self._ensure_bucket(bucket):
            return
        live = self.view.keys(bucket)
        on_disk = self.store.index.get(bucket, {})
        for name, key in live.items():
            if on_disk.get(name) != self.view.signature(key):
                self._write(bucket, name, key)
        for name in set(on_disk) - set(live):
            self.store.delete_object(bucket, name)

    def sync_key(self, bucket: str, name: str, method: str) -> None:
        if not self._ensure_bucket(bucket):
            return
        key = self.view.key(bucket, name)
        stored = self.store.index.get(bucket, {}).get(name)
        if key is None and stored is None:
            if method != "DELETE":
                # A successful write to a key that does not exist: the key in the URL was read
                # differently from moto (encoding, virtual-host style). Compare the whole bucket.
                self.sync_bucket(bucket)
            return
        if key is None:
            self.store.delete_object(bucket, name)
        elif stored != self.view.signature(key):
            self._write(bucket, name, key)

    def _write(self, bucket: str, name: str, key: Any) -> None:
        self.store.put_object(
            bucket, name, key.value, self.view.signature(key), self.view.metadata(key)
        )


def _target(environ: dict[str, Any]) -> tuple[str | None, str | None]:
    """(bucket, key) of a path-style request; (None, None) when the bucket is in the host name."""
    host = (environ.get("HTTP_HOST") or "").rsplit(":", 1)[0].strip("[]")
    if host and host != "localhost" and not _is_ip(host):
        return None, None  # virtual-host style: leave the parsing to moto, compare everything
    raw = environ.get("RAW_URI") or environ.get("REQUEST_URI") or environ.get("PATH_INFO", "")
    if raw.startswith(("http://", "https://")):
        raw = urlsplit(raw).path
    path = raw.split("?", 1)[0].lstrip("/")
    if not path:
        return None, None
    bucket, _, key = path.partition("/")
    return unquote(bucket), (unquote(key) if key else None)


def _is_ip(host: str) -> bool:
    import ipaddress

    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _error(start_response: Callable, status: str, code: str, message: str) -> list[bytes]:
    from xml.sax.saxutils import escape

    body = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{code}</Code><Message>{escape(message)}</Message></Error>"
    ).encode()
    start_response(status, [("Content-Type", "application/xml"), ("Content-Length", str(len(body)))])
    return [body]


# ------------------------------------------------------------------------------------ server


def restore(store: DiskStore, view: MotoView, progress_every_s: float = 2.0) -> tuple[int, int]:
    """Load every stored bucket and object into moto; (objects, bytes). Logs progress."""
    started = last = time.monotonic()
    _, expected, expected_bytes = store_stats(store.root)
    _log(f"restoring {expected} objects ({expected_bytes / 1e6:.1f} MB) from {store.root}")
    count = size = 0
    for stored in store.load():
        view.restore_bucket(stored.bucket, store.regions[stored.bucket])
        view.restore_object(stored)
        count += 1
        size += stored.size
        if time.monotonic() - last >= progress_every_s:
            last = time.monotonic()
            _log(f"  {count}/{expected} objects, {size / 1e6:.1f}/{expected_bytes / 1e6:.1f} MB")
    for bucket, region in store.regions.items():  # empty buckets too
        view.restore_bucket(bucket, region)
    _log(f"restored {count} objects ({size / 1e6:.1f} MB) in {len(store.regions)} buckets "
         f"in {time.monotonic() - started:.1f}s")  # fmt: skip
    return count, size


def build_app(store: DiskStore | None, credentials: dict[str, str]) -> Callable:
    """moto's S3 app, written through to ``store`` (None: in memory only), behind the signature
    check. The check comes first: an unsigned request reaches neither moto nor the disk."""
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app

    from advflow.infra.local.s3_auth import RequireSignature

    app: Callable = RawPutBody(DomainDispatcherApplication(create_backend_app))
    if store is not None:
        app = WriteThrough(app, store, MotoView())
    return RequireSignature(app, credentials, log=_log)


_FORM_TYPES = ("application/x-www-form-urlencoded", "multipart/form-data")


class RawPutBody:
    """A PUT's body is the object, whatever its Content-Type says. moto's server (Flask) parses a
    body sent as a form (urllib's and `curl --data-binary`'s default Content-Type) into form fields:
    the object was stored EMPTY with a 200, or a binary body hung the request and failed with 400.
    Such a PUT reaches moto as application/octet-stream instead (the object's stored Content-Type
    is then that, not the form type the client defaulted to). Runs after the signature check,
    which must see the header as the client signed it. POST (S3's browser form upload) is left as is."""

    def __init__(self, app: Callable):
        self.app = app

    def __call__(self, environ: dict[str, Any], start_response: Callable) -> Iterable[bytes]:
        ctype = (environ.get("CONTENT_TYPE") or "").split(";")[0].strip().lower()
        if environ.get("REQUEST_METHOD") == "PUT" and ctype in _FORM_TYPES:
            environ = {**environ, "CONTENT_TYPE": "application/octet-stream"}
        return self.app(environ, start_response)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m advflow.infra.local.s3_store",
        description="moto's S3 server with buckets kept on disk (written through on every change), "
        "answering only requests signed with the key in --credentials-file",
    )
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--data-dir", help="the store's folder (created if missing)")
    where.add_argument("--memory", action="store_true", help="keep buckets in memory only (lost at exit)")
    parser.add_argument(
        "--credentials-file", required=True,
        help="AWS shared-credentials file (profile advflow-stack) with the only key accepted",
    )  # fmt: skip
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=29000, help="port (default 29000)")
    args = parser.parse_args(argv)
    os.environ.setdefault("MOTO_PORT", str(args.port))  # moto builds some URLs with it

    from moto.moto_server.werkzeug_app import MotoRequestHandler
    from werkzeug.serving import make_server

    from advflow.infra.local.s3_auth import read_credentials

    try:
        credentials = read_credentials(Path(args.credentials_file))
        store = None if args.memory else DiskStore(Path(args.data_dir))
    except (RuntimeError, ValueError) as exc:
        print(f"s3_store: error: {exc}", file=sys.stderr)
        return 1
    app = build_app(store, credentials)
    if store is not None:
        restore(store, MotoView())  # before the port opens: no client sees a half-restored store
    server = make_server(args.host, args.port, app, threaded=True, request_handler=MotoRequestHandler)
    where_text = f"store {store.id} in {store.root}" if store is not None else "buckets in memory only"
    _log(f"serving S3 on http://{args.host}:{args.port}, {where_text}; requests must be signed with "
         f"the key in {args.credentials_file}")  # fmt: skip
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
