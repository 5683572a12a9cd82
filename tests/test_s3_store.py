"""The stack's persistent S3 endpoint (advflow.infra.local.s3_store): moto written through to disk.

Each test starts the real server process (services.start_persistent_s3) on a free port, talks to it
with the clients advflow uses (boto3, s3fs), kills it with SIGKILL (no clean shutdown, as when the
machine dies) and checks what a fresh server on the same folder serves.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import urllib.error
import urllib.request

import pytest

from advflow.infra.local import services
from advflow.infra.local.proc import session_members
from advflow.infra.local.s3_store import store_id, store_stats

BUCKET = "store-test"


def _start(tmp_path: Path) -> services.ServiceHandle:
    return services.start_persistent_s3(tmp_path / "state", tmp_path / "data", timeout_s=60)


def _kill(handle: services.ServiceHandle) -> None:
    """SIGKILL the whole server session: nothing gets to flush or clean up."""
    for pid in [handle.pid, *session_members(handle.pid)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    handle.stop(grace_s=1)  # reaps the child; the session is already gone


def _signed(method: str, url: str, creds: dict[str, str]) -> "urllib.request.Request":
    """A raw request signed (SigV4) as an SDK would, for paths no SDK call reaches."""
    import urllib.request

    from botocore.auth import S3SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    request = AWSRequest(method=method, url=url, data=b"")
    key = Credentials(creds["AWS_ACCESS_KEY_ID"], creds["AWS_SECRET_ACCESS_KEY"])
    S3SigV4Auth(key, "s3", "us-east-1").add_auth(request)
    return urllib.request.Request(url, method=method, headers=dict(request.headers.items()))


def _snapshot(client, bucket: str) -> dict[str, dict]:
    """Everything a client can see of every object: bytes, ETag, time, type, metadata."""
    out = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for obj in page.get("Contents", []):
            got = client.get_object(Bucket=bucket, Key=obj["Key"])
            out[obj["Key"]] = {
                "body": got["Body"].read(),
                "etag": got["ETag"],
                "last_modified": got["LastModified"],
                "content_type": got.get("ContentType"),
                "metadata": got["Metadata"],
            }
    return out


@pytest.mark.integration
def test_every_change_survives_a_sigkill(tmp_path):
    from boto3.s3.transfer import TransferConfig

    s3 = _start(tmp_path)
    client = services.s3_client(s3, timeout_s=30)
    services.ensure_bucket(s3, BUCKET)
    services.ensure_bucket(s3, "empty-bucket")
    big = os.urandom(11 * 1024 * 1024)  # three 5 MiB parts: a multipart upload
    client.upload_fileobj(io.BytesIO(big), BUCKET, "ckpt/model.bin",
                          Config=TransferConfig(multipart_threshold=5 << 20, multipart_chunksize=5 << 20))  # fmt: skip
    client.put_object(Bucket=BUCKET, Key="data/a.json", Body=b'{"a": 1}', ContentType="application/json",
                      Metadata={"origin": "test"})  # fmt: skip
    client.put_object(Bucket=BUCKET, Key="data/a.json/child", Body=b"a key below another key")
    client.put_object(Bucket=BUCKET, Key="odd keys/ü+%20?&#.txt", Body=b"odd")
    client.put_object(Bucket=BUCKET, Key="data/overwritten", Body=b"old")
    client.put_object(Bucket=BUCKET, Key="data/overwritten", Body=b"new")
    client.copy_object(Bucket=BUCKET, Key="data/copy.json", CopySource={"Bucket": BUCKET, "Key": "data/a.json"})
    client.put_object(Bucket=BUCKET, Key="gone/1", Body=b"1")
    client.put_object(Bucket=BUCKET, Key="gone/2", Body=b"2")
    client.put_object(Bucket=BUCKET, Key="gone/3", Body=b"3")
    client.delete_objects(Bucket=BUCKET, Delete={"Objects": [{"Key": "gone/1"}, {"Key": "gone/2"}]})
    client.delete_object(Bucket=BUCKET, Key="gone/3")
    client.create_bucket(Bucket="removed-bucket")
    client.delete_bucket(Bucket="removed-bucket")
    before = _snapshot(client, BUCKET)
    assert before["ckpt/model.bin"]["etag"].endswith('-3"')  # it really was a multipart upload
    the_id = store_id(tmp_path / "data")

    _kill(s3)
    # A crash between writing an object's bytes and its metadata leaves an unnamed data file.
    some_dir = next(p for p in (tmp_path / "data" / "buckets" / BUCKET).iterdir() if p.is_dir())
    (some_dir / ("0" * 64 + ".deadbeef.data")).write_bytes(b"torn")

    s3 = _start(tmp_path)
    try:
        client = services.s3_client(s3, timeout_s=30)
        after = _snapshot(client, BUCKET)
        assert after == before  # bytes, ETags (multipart too), times, types, metadata
        assert after["ckpt/model.bin"]["body"] == big
        assert after["data/overwritten"]["body"] == b"new"
        assert not any(key.startswith("gone/") for key in after)
        names = {b["Name"] for b in client.list_buckets()["Buckets"]}
        assert names == {BUCKET, "empty-bucket"}
        assert store_id(tmp_path / "data") == the_id
        assert not list(some_dir.glob("*.deadbeef.data"))  # the leftover was removed
        # Range reads and prefix/delimiter listings, as the data reader and s3fs use them.
        ranged = client.get_object(Bucket=BUCKET, Key="ckpt/model.bin", Range="bytes=100-199")
        assert ranged["Body"].read() == big[100:200]
        listed = client.list_objects_v2(Bucket=BUCKET, Prefix="data/", Delimiter="/")
        assert [o["Key"] for o in listed["Contents"]] == ["data/a.json", "data/copy.json", "data/overwritten"]
        assert [p["Prefix"] for p in listed["CommonPrefixes"]] == ["data/a.json/"]
        assert "restored 6 objects" in s3.log_path.read_text()
        assert store_stats(tmp_path / "data")[:2] == (2, 6)
    finally:
        s3.stop()


@pytest.mark.integration
def test_s3fs_writes_are_kept_and_reset_is_refused(tmp_path):
    import s3fs
    import urllib.request

    s3 = _start(tmp_path)
    try:
        services.ensure_bucket(s3, BUCKET)
        fs = s3fs.S3FileSystem(
            key=s3.env["AWS_ACCESS_KEY_ID"], secret=s3.env["AWS_SECRET_ACCESS_KEY"],
            client_kwargs={"endpoint_url": s3.url, "region_name": "us-east-1"},
        )
        fs.pipe(f"{BUCKET}/shards/000.bin", b"x" * 1000)
        with fs.open(f"{BUCKET}/shards/001.bin", "wb", block_size=5 << 20) as fh:  # s3fs's multipart
            fh.write(b"y" * (6 << 20))
        fs.rm(f"{BUCKET}/shards/000.bin")
        # moto's reset would empty memory while the disk keeps everything: refused, and why.
        # (Unsigned it does not even get that far.)
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(urllib.request.Request(f"{s3.url}/moto-api/reset", method="POST"), timeout=10)
        assert info.value.code == 403
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(_signed("POST", f"{s3.url}/moto-api/reset", s3.env), timeout=10)
        assert info.value.code == 409 and "remove that folder" in info.value.read().decode()
        # Tags are served but not kept: the log says so.
        services.s3_client(s3).put_object_tagging(
            Bucket=BUCKET, Key="shards/001.bin", Tagging={"TagSet": [{"Key": "k", "Value": "v"}]}
        )
        assert "does not keep tagging" in s3.log_path.read_text()
    finally:
        _kill(s3)
    s3 = _start(tmp_path)
    try:
        fs = s3fs.S3FileSystem(
            key=s3.env["AWS_ACCESS_KEY_ID"], secret=s3.env["AWS_SECRET_ACCESS_KEY"],
            client_kwargs={"endpoint_url": s3.url, "region_name": "us-east-1"}, skip_instance_cache=True,
        )
        assert fs.ls(f"{BUCKET}/shards") == [f"{BUCKET}/shards/001.bin"]
        assert fs.cat_file(f"{BUCKET}/shards/001.bin", start=10, end=20) == b"y" * 10
    finally:
        s3.stop()


def test_a_damaged_store_file_names_the_file_and_the_fix(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "store.json").write_text("{not json")
    with pytest.raises(RuntimeError, match="store.json.*move the folder"):
        store_id(data)


@pytest.mark.integration
def test_restore_progress_is_logged_for_a_large_store(tmp_path):
    s3 = _start(tmp_path)
    client = services.s3_client(s3)
    services.ensure_bucket(s3, BUCKET)
    for i in range(200):
        client.put_object(Bucket=BUCKET, Key=f"many/{i:04d}", Body=b"z" * 100)
    s3.stop()
    # In a child process: restoring fills moto's in-process backend, which this test session's own
    # moto server (conftest) shares.
    script = (
        "import sys; from advflow.infra.local import s3_store as m; "
        "print(m.restore(m.DiskStore(sys.argv[1]), m.MotoView(), progress_every_s=0.0))"
    )
    started = time.monotonic()
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path / "data")],
                         capture_output=True, text=True, timeout=120, check=True).stdout  # fmt: skip
    lines = out.splitlines()
    assert lines[-1] == f"(200, {200 * 100})"
    assert lines[0] == "[s3-store] restoring 200 objects (0.0 MB) from " + str((tmp_path / "data").resolve())
    assert any("/200 objects" in line for line in lines[1:-2])  # progress while it runs
    assert lines[-2].startswith("[s3-store] restored 200 objects")
    assert time.monotonic() - started < 60
    assert json.loads((tmp_path / "data" / "store.json").read_text())["format"] == 1


# ------------------------------------------------------------------------------ credentials


def _refusal(call) -> str:
    """The S3 error code a call got; fails the test when the call was answered."""
    from botocore.exceptions import ClientError

    try:
        call()
    except ClientError as exc:
        status = exc.response["ResponseMetadata"]["HTTPStatusCode"]
        assert status == 403, exc.response
        return exc.response["Error"]["Code"]
    raise AssertionError("the endpoint answered a request made without the stack's credentials")


@pytest.mark.integration
def test_only_the_generated_credentials_read_write_and_list(tmp_path):
    import boto3
    from botocore import UNSIGNED
    from botocore.config import Config

    s3 = _start(tmp_path)
    try:
        creds_file = tmp_path / "state" / services.S3_CREDENTIALS_FILE
        assert oct(creds_file.stat().st_mode & 0o777) == "0o600"  # a secret: owner-only
        assert s3.env["AWS_SECRET_ACCESS_KEY"] in creds_file.read_text()
        assert s3.env["AWS_ACCESS_KEY_ID"] != "testing" and len(s3.env["AWS_SECRET_ACCESS_KEY"]) >= 40
        services.ensure_bucket(s3, BUCKET)
        good = services.s3_client(s3)
        good.put_object(Bucket=BUCKET, Key="kept", Body=b"right key")

        def client(**kw):
            return boto3.session.Session().client("s3", endpoint_url=s3.url, region_name="us-east-1", **kw)

        clients = {
            "wrong secret": client(aws_access_key_id=s3.env["AWS_ACCESS_KEY_ID"], aws_secret_access_key="x" * 40),
            "wrong key id": client(aws_access_key_id="testing", aws_secret_access_key="testing"),
            "unsigned": client(config=Config(signature_version=UNSIGNED)),
        }
        expected = {"wrong secret": "SignatureDoesNotMatch", "wrong key id": "InvalidAccessKeyId",
                    "unsigned": "AccessDenied"}  # fmt: skip
        for name, bad in clients.items():
            calls = {
                "read": lambda: bad.get_object(Bucket=BUCKET, Key="kept"),
                "write": lambda: bad.put_object(Bucket=BUCKET, Key="planted", Body=b"x" * 70_000),
                "list": lambda: bad.list_objects_v2(Bucket=BUCKET),
                "list buckets": lambda: bad.list_buckets(),
                "delete": lambda: bad.delete_object(Bucket=BUCKET, Key="kept"),
            }
            for what, call in calls.items():
                assert _refusal(call) == expected[name], (name, what)
        # Nothing a refused request sent reached moto or the disk; the right key still works.
        assert [o["Key"] for o in good.list_objects_v2(Bucket=BUCKET)["Contents"]] == ["kept"]
        assert store_stats(tmp_path / "data")[:2] == (1, 1)
        assert good.get_object(Bucket=BUCKET, Key="kept")["Body"].read() == b"right key"
        assert "refused GET" in s3.log_path.read_text()
        # The message says what to do.
        from botocore.exceptions import ClientError

        with pytest.raises(ClientError, match=r"advflow stack env"):
            clients["unsigned"].get_object(Bucket=BUCKET, Key="kept")
    finally:
        s3.stop()
    # A restart keeps the key: clients holding it (MLflow, a shell's exports) keep working.
    s3 = _start(tmp_path)
    try:
        assert services.s3_client(s3).get_object(Bucket=BUCKET, Key="kept")["Body"].read() == b"right key"
    finally:
        s3.stop()


@pytest.mark.integration
def test_storage_follows_a_change_of_credentials_in_the_same_process(tmp_path, monkeypatch):
    """Storage shares one aiobotocore session per process, and a session keeps the keys it first
    resolved: after the environment switches to the right keys (a new `advflow stack env`), a new
    Storage must use them, not the rejected ones it saw first."""
    from advflow.platform.data.storage import Storage, StorageAuthError

    s3 = _start(tmp_path)
    try:
        services.ensure_bucket(s3, BUCKET)
        services.s3_client(s3).put_object(Bucket=BUCKET, Key="p/kept", Body=b"x")
        monkeypatch.setenv("AWS_ENDPOINT_URL", s3.url)
        monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "stale-key")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "stale-secret")
        with pytest.raises(StorageAuthError):
            Storage(f"s3://{BUCKET}/p").list_sizes()
        for key, value in s3.env.items():
            monkeypatch.setenv(key, value)
        assert Storage(f"s3://{BUCKET}/p").list_sizes() == {"kept": 1}
    finally:
        s3.stop()
