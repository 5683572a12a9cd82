"""Presigned URLs (SigV4 query-string auth) at the stack's S3 endpoint (issue 24, "Trust at the edges").

The endpoint checks a presigned URL with the same key, time window and constant-time comparison as
a header signature: X-Amz-Expires must be a whole number of seconds in 1..604800 (AWS's 7 days), an
X-Amz-Date over 15 minutes ahead is refused, an expired URL is refused, and any change to the URL
(key, path, X-Amz-Expires, signature) or another access key is refused.

The fast tests call `verify` on a WSGI environ built from a URL that boto3 presigned (no server:
`generate_presigned_url` only signs); the integration test presigns GET and PUT against the real
persistent S3 server (services.start_persistent_s3, whose app is behind RequireSignature) and
fetches them with urllib, as a browser or curl would.
"""

from __future__ import annotations

import datetime as dt
import time
import urllib.error
import urllib.request
from urllib.parse import parse_qsl, urlencode, urlsplit

import pytest

from advflow.infra.local.s3_auth import MAX_PRESIGN_S, Refused, verify

KEY_ID, SECRET = "ADVF0123456789ABCDEF", "s" * 40
ENDPOINT = "http://127.0.0.1:29000"
T0 = dt.datetime(2025, 3, 1, 12, 0, 0, tzinfo=dt.timezone.utc)


def _client(endpoint: str = ENDPOINT, key_id: str = KEY_ID, secret: str = SECRET):
    import boto3
    from botocore.config import Config

    return boto3.session.Session().client(
        "s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id=key_id,
        aws_secret_access_key=secret, config=Config(signature_version="s3v4", s3={"addressing_style": "path"}),
    )  # fmt: skip


def _presign(method: str = "get_object", key: str = "data/a b+c.bin", expires: int = 600, at: dt.datetime = T0,
             **client_kw) -> str:
    """A URL boto3 presigns as of `at` (botocore reads the signing time from datetime.datetime.utcnow)."""
    from unittest import mock

    import botocore.auth

    class Frozen(dt.datetime):
        @classmethod
        def utcnow(cls):
            return at.replace(tzinfo=None)

        @classmethod
        def now(cls, tz=None):
            return at if tz else at.replace(tzinfo=None)

    with mock.patch.object(botocore.auth.datetime, "datetime", Frozen):
        return _client(**client_kw).generate_presigned_url(
            method, Params={"Bucket": "bkt", "Key": key}, ExpiresIn=expires)


def _environ(url: str, method: str = "GET") -> dict:
    parts = urlsplit(url)
    return {"REQUEST_METHOD": method, "RAW_URI": parts.path + ("?" + parts.query if parts.query else ""),
            "PATH_INFO": parts.path, "QUERY_STRING": parts.query, "HTTP_HOST": parts.netloc}


def _edit_query(url: str, **changes: str) -> str:
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query, keep_blank_values=True))
    query.update(changes)
    return parts._replace(query=urlencode(query, safe="/")).geturl()


def _code(url: str, method: str = "GET", now: dt.datetime = T0 + dt.timedelta(seconds=5)) -> str | None:
    try:
        verify(_environ(url, method), KEY_ID, SECRET, now=now)
    except Refused as exc:
        assert "\n" not in str(exc)
        return exc.code
    return None


def _presign_v2(method: str = "get_object", key: str = "data/a b+c.bin", expires: int = 600, at: dt.datetime = T0,
                secret: str = SECRET, **params) -> str:
    """A URL boto3 presigns with its default signer for S3 without signature_version (Signature
    Version 2 query auth: AWSAccessKeyId, Expires, Signature), as a user's plain client does."""
    import boto3
    from botocore.config import Config
    from unittest import mock

    client = boto3.session.Session().client(
        "s3", endpoint_url=ENDPOINT, region_name="us-east-1", aws_access_key_id=KEY_ID, aws_secret_access_key=secret,
        config=Config(signature_version="s3", s3={"addressing_style": "path"}))  # fmt: skip
    with mock.patch("time.time", return_value=at.timestamp()):
        url = client.generate_presigned_url(method, Params={"Bucket": "bkt", "Key": key, **params}, ExpiresIn=expires)
    assert "AWSAccessKeyId=" in url and "X-Amz-Signature" not in url
    return url


def test_a_default_boto3_presigned_url_signature_v2_is_accepted_with_the_stacks_key():
    # What users hit first: boto3 presigns S3 URLs with Signature Version 2 unless told otherwise.
    assert _code(_presign_v2()) is None
    assert _code(_presign_v2("put_object"), "PUT") is None
    with_override = _presign_v2(ResponseContentType="image/png", ResponseContentDisposition="inline")
    assert _code(with_override) is None
    # Its Expires is the end of the window.
    url = _presign_v2(expires=60)
    assert _code(url, now=T0 + dt.timedelta(seconds=60)) is None
    with pytest.raises(Refused, match=r"expired at 2025-03-01 12:01:00 UTC; presign a new one"):
        verify(_environ(url), KEY_ID, SECRET, now=T0 + dt.timedelta(seconds=61))


def test_any_change_to_a_signature_v2_url_is_refused():
    url = _presign_v2()
    parts = urlsplit(url)
    changed = {
        "key": parts._replace(path=parts.path.replace("a%20b", "z%20b")).geturl(),
        "Expires": _edit_query(url, Expires=str(int(T0.timestamp()) + 3600)),
        "signature": _edit_query(url, Signature="AAAA" + dict(parse_qsl(parts.query))["Signature"][4:]),
        "sub-resource added": _edit_query(url, **{"response-content-type": "text/html"}),
        "access key": _edit_query(url, AWSAccessKeyId="AKIAOTHEROTHEROTHER1"),
    }
    for what, edited in changed.items():
        assert _code(edited) in {"SignatureDoesNotMatch", "InvalidAccessKeyId"}, what
    assert _code(_presign_v2(secret="x" * 40)) == "SignatureDoesNotMatch"
    assert _code(url, "PUT") == "SignatureDoesNotMatch"  # a GET URL used to PUT
    # Longer than AWS's 7 days (the same limit as SigV4 presigned URLs) is refused.
    assert _code(_presign_v2(expires=MAX_PRESIGN_S + 3600)) == "AuthorizationQueryParametersError"


def test_a_presigned_get_and_put_are_accepted_within_their_window():
    assert _code(_presign()) is None
    assert _code(_presign("put_object"), "PUT") is None
    # The last second of the window still counts; the first one after it does not.
    url = _presign(expires=60)
    assert _code(url, now=T0 + dt.timedelta(seconds=60)) is None
    assert _code(url, now=T0 + dt.timedelta(seconds=61)) == "AccessDenied"
    # AWS's longest window (7 days) is accepted.
    assert _code(_presign(expires=MAX_PRESIGN_S), now=T0 + dt.timedelta(days=6)) is None


def test_an_expired_presigned_url_is_refused_and_says_so():
    url = _presign(expires=60)
    with pytest.raises(Refused, match=r"expired at 2025-03-01 12:01:00 UTC; presign a new one"):
        verify(_environ(url), KEY_ID, SECRET, now=T0 + dt.timedelta(hours=1))


@pytest.mark.parametrize("expires", ["0", "604801", "-5", "abc", "1.5", "", "٣"])
def test_x_amz_expires_must_be_whole_seconds_up_to_seven_days(expires):
    # Refused on the value alone (before the signature): a valid signature would not make it valid.
    url = _edit_query(_presign(), **{"X-Amz-Expires": expires})
    with pytest.raises(Refused, match=r"X-Amz-Expires must be a whole number of seconds from 1 to 604800") as exc:
        verify(_environ(url), KEY_ID, SECRET, now=T0)
    assert exc.value.code == "AuthorizationQueryParametersError"


def test_a_validly_signed_url_longer_than_seven_days_is_refused():
    url = _presign(expires=MAX_PRESIGN_S + 1)  # botocore signs any ExpiresIn; AWS refuses over 7 days
    assert _code(url, now=T0) == "AuthorizationQueryParametersError"


def test_a_presigned_url_without_x_amz_expires_is_refused():
    parts = urlsplit(_presign())
    query = [(k, v) for k, v in parse_qsl(parts.query) if k != "X-Amz-Expires"]
    assert _code(parts._replace(query=urlencode(query, safe="/")).geturl(), now=T0) == "AuthorizationQueryParametersError"


def test_a_presigned_url_dated_in_the_future_is_refused():
    ahead = _presign(at=T0 + dt.timedelta(minutes=16))
    with pytest.raises(Refused, match="over 15 minutes in the future"):
        verify(_environ(ahead), KEY_ID, SECRET, now=T0)
    # Clock skew within AWS's 15 minutes is tolerated, as for header signatures.
    assert _code(_presign(at=T0 + dt.timedelta(minutes=14)), now=T0) is None


def test_any_change_to_a_presigned_url_is_refused():
    url = _presign(expires=600)
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    tampered = {
        "another key": parts._replace(path=parts.path.replace("a%20b", "a%20c")).geturl(),
        "another bucket": parts._replace(path=parts.path.replace("/bkt/", "/other/")).geturl(),
        "a longer X-Amz-Expires": _edit_query(url, **{"X-Amz-Expires": "3600"}),
        "another signature": _edit_query(url, **{"X-Amz-Signature": "0" * 64}),
        "a non-hex signature": _edit_query(url, **{"X-Amz-Signature": "é" * 64}),
        "an added parameter": _edit_query(url, **{"response-content-type": "text/html"}),
    }
    for what, bad in tampered.items():
        assert _code(bad) == "SignatureDoesNotMatch", what
    # GET's URL used for a PUT or DELETE: the method is signed too.
    assert _code(url, "PUT") == "SignatureDoesNotMatch"
    assert _code(url, "DELETE") == "SignatureDoesNotMatch"
    # Another access key (its own valid signature) and the right key id with another secret.
    assert _code(_presign(key_id="AKIAOTHEROTHEROTHER1")) == "InvalidAccessKeyId"
    with pytest.raises(Refused, match="changed after presigning, or presigned with another secret key"):
        verify(_environ(_presign(secret="x" * 40)), KEY_ID, SECRET, now=T0)
    # The date is part of the signature: moving it (to extend the window) breaks it.
    later = (T0 + dt.timedelta(hours=1)).strftime("%Y%m%dT%H%M%SZ")
    assert _code(_edit_query(url, **{"X-Amz-Date": later}), now=T0 + dt.timedelta(hours=1)) == "SignatureDoesNotMatch"
    assert query["X-Amz-Algorithm"] == "AWS4-HMAC-SHA256"


def test_a_presigned_url_must_sign_the_host():
    url = _edit_query(_presign(), **{"X-Amz-SignedHeaders": "x-amz-date"})
    with pytest.raises(Refused, match="host header must be signed"):
        verify(_environ(url), KEY_ID, SECRET, now=T0)


# ------------------------------------------------------------------------------ the real endpoint


def _status(url: str, method: str = "GET", data: bytes | None = None) -> tuple[int, bytes]:
    # An explicit Content-Type here; urllib's default (a form) has its own case in the endpoint test.
    headers = {"Content-Type": "application/octet-stream"} if data is not None else {}
    request = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


@pytest.mark.integration
def test_presigned_get_and_put_against_the_stacks_endpoint(tmp_path):
    from advflow.infra.local import services

    s3 = services.start_persistent_s3(tmp_path / "state", tmp_path / "data", timeout_s=60)
    try:
        services.ensure_bucket(s3, "bkt")
        key_id, secret = s3.env["AWS_ACCESS_KEY_ID"], s3.env["AWS_SECRET_ACCESS_KEY"]
        client = _client(s3.url, key_id, secret)

        def presign(method: str, key: str, expires: int = 300, **kw) -> str:
            return _client(s3.url, kw.get("key_id", key_id), kw.get("secret", secret)).generate_presigned_url(
                method, Params={"Bucket": "bkt", "Key": key}, ExpiresIn=expires)

        # PUT through a presigned URL, GET it back through another; the object is really there.
        status, _ = _status(presign("put_object", "shared/grid 1.png"), "PUT", b"\x89PNG presigned body")
        assert status == 200
        assert client.get_object(Bucket="bkt", Key="shared/grid 1.png")["Body"].read() == b"\x89PNG presigned body"
        # A PUT with urllib's / curl --data-binary's default Content-Type (a form): the body is the
        # object, not form fields (moto stored it empty, or a binary one hung and failed).
        for body in (b"plain text body", b"a=b&c=d", b"\x89PNG\x00\xff binary"):
            form = urllib.request.Request(presign("put_object", "shared/form.bin"), data=body, method="PUT")
            assert form.get_method() == "PUT" and not form.has_header("Content-type")  # urllib adds the form type
            with urllib.request.urlopen(form, timeout=30) as answer:
                assert answer.status == 200
            assert client.get_object(Bucket="bkt", Key="shared/form.bin")["Body"].read() == body
        get = presign("get_object", "shared/grid 1.png")
        assert _status(get) == (200, b"\x89PNG presigned body")
        # boto3's default presigner (Signature Version 2, as a user's plain client makes it).
        import boto3

        plain = boto3.session.Session().client("s3", endpoint_url=s3.url, region_name="us-east-1",
                                               aws_access_key_id=key_id, aws_secret_access_key=secret)
        v2 = plain.generate_presigned_url("get_object", Params={"Bucket": "bkt", "Key": "shared/grid 1.png"})
        assert "AWSAccessKeyId=" in v2
        assert _status(v2) == (200, b"\x89PNG presigned body")
        assert _status(_edit_query(v2, Signature="A" * 28))[0] == 403

        # Refused: another key (path), another X-Amz-Expires, another signature, another access key,
        # another secret, a GET URL used to PUT. Each answer is S3's 403 XML naming the reason.
        client.put_object(Bucket="bkt", Key="shared/other.png", Body=b"other")
        parts = urlsplit(get)
        refused = {
            "another key": (parts._replace(path=parts.path.replace("grid%201", "other")).geturl(), "GET"),
            "X-Amz-Expires": (_edit_query(get, **{"X-Amz-Expires": "3600"}), "GET"),
            "X-Amz-Expires too long": (_edit_query(get, **{"X-Amz-Expires": "604801"}), "GET"),
            "signature": (_edit_query(get, **{"X-Amz-Signature": "f" * 64}), "GET"),
            "other access key": (presign("get_object", "shared/grid 1.png", key_id="AKIAOTHEROTHEROTHER1"), "GET"),
            "other secret": (presign("get_object", "shared/grid 1.png", secret="x" * 40), "GET"),
            "method": (get, "PUT"),
        }
        for what, (url, method) in refused.items():
            status, body = _status(url, method, b"planted" if method == "PUT" else None)
            assert status == 403, (what, status, body)
            assert b"<Code>" in body, what
        assert client.get_object(Bucket="bkt", Key="shared/grid 1.png")["Body"].read() == b"\x89PNG presigned body"

        # Expired: a one-second URL, used after it ran out.
        short = presign("get_object", "shared/grid 1.png", expires=1)
        time.sleep(2.2)
        status, body = _status(short)
        assert status == 403 and b"expired" in body, body
        assert "refused GET" in s3.log_path.read_text()
    finally:
        s3.stop()
