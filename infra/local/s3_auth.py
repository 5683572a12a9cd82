"""Credentials for the stack's S3 endpoint: the 0600 credentials file and SigV4 checking.

moto's server accepts any request, signed or not, with any key. The stack's endpoint holds every
dataset, checkpoint and model, and a checkpoint is code-adjacent (it is loaded on resume), so the
endpoint answers only requests signed (AWS Signature Version 4) with the key that ``advflow stack up``
generated. Checked here, in front of moto, rather than with moto's IAM mode
(``INITIAL_NO_AUTH_ACTION_COUNT``): that mode keeps its users in moto's memory (gone after every
restart, recreated by whoever starts the server) and evaluates IAM policies per request; this check
needs one key and one HMAC per request and does not depend on moto's internals.

What is verified: the signature over method, path, query, the signed headers and the payload hash
the client declared (``x-amz-content-sha256``), in the header form every SDK uses (boto3, s3fs /
aiobotocore, pyarrow's AWS SDK, MLflow through boto3) and the presigned-query form; the request time
must be within 15 minutes, as on AWS. Presigned URLs: SigV4 (X-Amz-Signature) and the Signature
Version 2 form boto3's generate_presigned_url makes by default (AWSAccessKeyId, Expires, Signature;
S3 and MinIO accept both), each with the stack's key, compared in constant time, for at most 7 days.
Not verified: that the body matches the declared hash, nor the per-chunk signatures of streaming
uploads (their seed signature is checked). Both would only matter to someone who can already
capture and replay loopback traffic.

The credentials file is an AWS shared-credentials file (INI, profile ``advflow-stack``), so the
same file that configures the server also configures every client that reads
``AWS_SHARED_CREDENTIALS_FILE`` + ``AWS_PROFILE`` (boto3, aiobotocore, the AWS C++ SDK in pyarrow):
the stack's Ray workers use it that way and never see the secret in an environment variable.
"""

from __future__ import annotations

import base64
import configparser
import datetime as dt
import hashlib
import hmac
import re
import secrets
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

from advflow.platform.atomic import write_text

PROFILE = "advflow-stack"
REGION = "us-east-1"
MAX_SKEW = dt.timedelta(minutes=15)  # AWS's own limit (RequestTimeTooSkewed)
MAX_PRESIGN_S = 7 * 24 * 3600  # AWS's longest X-Amz-Expires for SigV4 presigned URLs (604800 s)
_ALGORITHM = "AWS4-HMAC-SHA256"
_AUTH_RE = re.compile(
    r"AWS4-HMAC-SHA256\s+Credential=(?P<credential>[^,\s]+)\s*,\s*"
    r"SignedHeaders=(?P<signed>[^,\s]+)\s*,\s*Signature=(?P<signature>[0-9a-fA-F]+)"
)


# ------------------------------------------------------------------------- the credentials file


def write_credentials(path: Path) -> dict[str, str]:
    """Write fresh credentials to ``path`` (mode 0600, atomically); return them as AWS_* variables."""
    key_id = "ADVF" + secrets.token_hex(8).upper()  # 20 characters, like an AWS key id
    secret = secrets.token_urlsafe(30)  # 40 characters, 240 random bits
    text = (
        "# advflow stack S3 credentials: written by `advflow stack up`, removed by `advflow stack down`\n"
        f"[{PROFILE}]\naws_access_key_id = {key_id}\naws_secret_access_key = {secret}\n"
        f"region = {REGION}\n"
    )
    write_text(path, text, mode=0o600)  # the temp file is 0600 from creation too
    return _as_env(key_id, secret)


def read_credentials(path: Path) -> dict[str, str]:
    """The AWS_* variables in ``path``; ValueError naming the file and the fix when unusable."""
    parser = configparser.ConfigParser()
    try:
        parser.read_string(Path(path).read_text())
        section = parser[PROFILE]
        return _as_env(section["aws_access_key_id"].strip(), section["aws_secret_access_key"].strip())
    except (OSError, configparser.Error, KeyError) as exc:
        raise ValueError(
            f"the S3 credentials file {path} is missing or unreadable ({exc!r}); "
            "`advflow stack down` and `advflow stack up` write a new one"
        ) from exc


def ensure_credentials(path: Path) -> dict[str, str]:
    """Keep a usable credentials file (a restarted S3 server keeps the key every client already
    has); write a new one when there is none or it is damaged."""
    try:
        return read_credentials(path)
    except ValueError:
        return write_credentials(path)


def profile_env(path: Path) -> dict[str, str]:
    """Variables that point a client at the file instead of carrying the secret itself."""
    return {"AWS_SHARED_CREDENTIALS_FILE": str(path), "AWS_PROFILE": PROFILE, "AWS_DEFAULT_REGION": REGION}


def _as_env(key_id: str, secret: str) -> dict[str, str]:
    return {"AWS_ACCESS_KEY_ID": key_id, "AWS_SECRET_ACCESS_KEY": secret, "AWS_DEFAULT_REGION": REGION}


# ------------------------------------------------------------------------------- verification


class Refused(Exception):
    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


def _encode(text: str, safe: str = "-_.~") -> str:
    return quote(text, safe=safe)


def _canonical_query(raw: str, drop: str | None = None) -> str:
    pairs = []
    for part in raw.split("&") if raw else []:
        name, _, value = part.partition("=")
        name, value = unquote(name), unquote(value)
        if name == drop:
            continue
        pairs.append((_encode(name), _encode(value)))
    return "&".join(f"{n}={v}" for n, v in sorted(pairs))


def _header(environ: dict[str, Any], name: str) -> str | None:
    if name == "content-type":
        return environ.get("CONTENT_TYPE")
    if name == "content-length":
        return environ.get("CONTENT_LENGTH")
    return environ.get("HTTP_" + name.upper().replace("-", "_"))


def _canonical_paths(environ: dict[str, Any]) -> list[str]:
    """The path as the client sent it and as the spec encodes it. Clients differ in which
    characters they leave unescaped in a key; either form signed with the right key is accepted."""
    raw = environ.get("RAW_URI") or environ.get("REQUEST_URI") or ""
    raw = raw.split("?", 1)[0]
    if raw.startswith(("http://", "https://")):
        raw = "/" + raw.split("://", 1)[1].partition("/")[2]
    if not raw:
        raw = quote(environ.get("PATH_INFO", "/") or "/", safe="/~")
    spec = _encode(unquote(raw), safe="-_.~/")
    return [raw] if spec == raw else [raw, spec]


def _signing_key(secret: str, date: str, region: str, service: str) -> bytes:
    key = ("AWS4" + secret).encode()
    for part in (date, region, service, "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    return key


def _check_presigned_window(when: dt.datetime, expires: str | None, now: dt.datetime) -> None:
    """A presigned URL's time checks, as AWS makes them: X-Amz-Expires is a whole number of seconds
    in 1..604800 (7 days), the URL is refused once X-Amz-Date + X-Amz-Expires has passed, and an
    X-Amz-Date over 15 minutes ahead of the server's clock is refused (a URL dated far ahead would
    otherwise stay valid for as long as its date is in the future, whatever X-Amz-Expires says).
    X-Amz-Expires is part of the signed query, so it cannot be changed without the key."""
    if expires is None or not (expires.isascii() and expires.isdigit()) or not 1 <= int(expires) <= MAX_PRESIGN_S:
        raise Refused(
            "AuthorizationQueryParametersError",
            f"X-Amz-Expires must be a whole number of seconds from 1 to {MAX_PRESIGN_S} (7 days), got "
            f"{expires!r}; presign again with ExpiresIn in that range",
        )
    if when - now > MAX_SKEW:
        raise Refused("AccessDenied", "the presigned URL's X-Amz-Date is over 15 minutes in the future; check the "
                      "clock of the machine that presigned it and presign again")  # fmt: skip
    end = when + dt.timedelta(seconds=int(expires))
    if now > end:
        raise Refused("AccessDenied", f"the presigned URL expired at {end:%Y-%m-%d %H:%M:%S} UTC; presign a new one")


def verify(environ: dict[str, Any], key_id: str, secret: str, now: dt.datetime | None = None) -> None:
    """Raise Refused unless the request is signed with ``key_id``/``secret`` (SigV4)."""
    query = environ.get("QUERY_STRING", "")
    auth = _header(environ, "authorization")
    presigned = "X-Amz-Signature=" in query or "x-amz-signature=" in query.lower()
    if auth:
        match = _AUTH_RE.match(auth.strip())
        if not match:
            raise Refused(
                "AccessDenied",
                "only AWS Signature Version 4 is accepted (Authorization: AWS4-HMAC-SHA256 ...); "
                "use an SDK's default s3v4 signer",
            )
        credential, signed, signature = match["credential"], match["signed"], match["signature"]
        amz_date = _header(environ, "x-amz-date") or ""
        payload = _header(environ, "x-amz-content-sha256") or hashlib.sha256(b"").hexdigest()
        canonical_query = _canonical_query(query)
        expires, presigned_form = None, False
    elif presigned:
        params = {unquote(k): unquote(v) for k, _, v in (p.partition("=") for p in query.split("&"))}
        if params.get("X-Amz-Algorithm") != _ALGORITHM:
            raise Refused("AccessDenied", "presigned URLs must use X-Amz-Algorithm=AWS4-HMAC-SHA256")
        credential = params.get("X-Amz-Credential", "")
        signed = params.get("X-Amz-SignedHeaders", "host")
        signature = params.get("X-Amz-Signature", "")
        amz_date = params.get("X-Amz-Date", "")
        payload = "UNSIGNED-PAYLOAD"
        canonical_query = _canonical_query(query, drop="X-Amz-Signature")
        expires, presigned_form = params.get("X-Amz-Expires"), True
    elif "Signature=" in query and "AWSAccessKeyId=" in query:
        # boto3's generate_presigned_url signs this way by default (no signature_version in the
        # client's config), and S3 and MinIO accept it: so does this endpoint, with the same key.
        return _verify_v2_query(environ, query, key_id, secret, now)
    else:
        raise Refused(
            "AccessDenied",
            "anonymous request: this endpoint answers only requests signed with the stack's S3 "
            "credentials (`eval \"$(advflow stack env)\"` exports them)",
        )
    scope = credential.split("/")
    if len(scope) != 5 or scope[4] != "aws4_request":
        raise Refused("AuthorizationHeaderMalformed", f"malformed credential scope {credential!r}")
    got_key, date, region, service, _ = scope
    if not hmac.compare_digest(got_key.encode(), key_id.encode()):
        raise Refused(
            "InvalidAccessKeyId",
            "the access key id is not the stack's; `eval \"$(advflow stack env)\"` exports the "
            "current one (it changes at every `advflow stack down` + `up`)",
        )
    try:
        when = dt.datetime.strptime(amz_date, "%Y%m%dT%H%M%SZ").replace(tzinfo=dt.timezone.utc)
    except ValueError:
        raise Refused("AccessDenied", "the request has no valid X-Amz-Date") from None
    now = now or dt.datetime.now(dt.timezone.utc)
    if presigned_form:
        _check_presigned_window(when, expires, now)
    elif abs(now - when) > MAX_SKEW:
        raise Refused("RequestTimeTooSkewed", "the request time differs from the server's by over 15 minutes")
    names = signed.lower().split(";")
    if "host" not in names:
        raise Refused("AccessDenied", "the host header must be signed")
    headers = []
    for name in names:
        value = _header(environ, name)
        if value is None:
            raise Refused("AccessDenied", f"signed header {name!r} is missing from the request")
        headers.append(f"{name}:{' '.join(value.split())}\n")
    key = _signing_key(secret, date, region, service)
    for path in _canonical_paths(environ):
        canonical = "\n".join([
            environ.get("REQUEST_METHOD", "GET"), path, canonical_query, "".join(headers), signed.lower(), payload,
        ])  # fmt: skip
        to_sign = "\n".join(
            [_ALGORITHM, amz_date, "/".join(scope[1:]), hashlib.sha256(canonical.encode()).hexdigest()]
        )
        expected = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
        # As bytes: compare_digest refuses str with non-ASCII characters, which a presigned URL's
        # X-Amz-Signature may carry (%-decoded), and that must be a refusal, not a server error.
        if hmac.compare_digest(expected.encode(), signature.lower().encode()):
            return
    if presigned_form:  # the key id matched: the URL was edited, or presigned with another secret
        raise Refused(
            "SignatureDoesNotMatch",
            "the presigned URL's signature does not match: it was changed after presigning, or presigned "
            "with another secret key; presign it again with the stack's credentials (`advflow stack env`)",
        )
    raise Refused(
        "SignatureDoesNotMatch",
        "the signature does not match: the secret access key is not the stack's; "
        "`eval \"$(advflow stack env)\"` exports the current one",
    )


# Query parameters that are part of a Signature Version 2 string to sign (S3's "sub-resources" and
# response overrides); any other parameter may be added or dropped without breaking the signature.
_V2_SUBRESOURCES = frozenset(
    "accelerate acl cors defaultObjectAcl delete lifecycle location logging metrics notification object-lock "
    "partNumber policy replication requestPayment response-cache-control response-content-disposition "
    "response-content-encoding response-content-language response-content-type response-expires restore "
    "select select-type storageClass tagging torrent uploadId uploads versionId versioning versions website "
    "analytics inventory".split()
)


def _verify_v2_query(environ: dict[str, Any], query: str, key_id: str, secret: str, now: dt.datetime | None) -> None:
    """A Signature Version 2 presigned URL (AWSAccessKeyId, Expires, Signature in the query): the
    same key (constant-time), the same 7-day limit and a base64 HMAC-SHA1 over method, Content-MD5,
    Content-Type, Expires, the x-amz-* values and the path with its sub-resources, as S3 defines it."""
    pairs = [(unquote(k), unquote(v), "=" in p) for p in query.split("&") if p
             for k, _, v in [p.partition("=")]]  # fmt: skip
    params = {k: v for k, v, _ in pairs}
    if not hmac.compare_digest(params.get("AWSAccessKeyId", "").encode(), key_id.encode()):
        raise Refused(
            "InvalidAccessKeyId",
            "the presigned URL's AWSAccessKeyId is not the stack's; presign it again with the stack's "
            "credentials (`advflow stack env`)",
        )
    expires = params.get("Expires", "")
    if not (expires.isascii() and expires.isdigit()):
        raise Refused("AccessDenied", f"the presigned URL's Expires must be a time in epoch seconds, got {expires!r}")
    now = now or dt.datetime.now(dt.timezone.utc)
    end = dt.datetime.fromtimestamp(int(expires), dt.timezone.utc)
    if now > end:
        raise Refused("AccessDenied", f"the presigned URL expired at {end:%Y-%m-%d %H:%M:%S} UTC; presign a new one")
    if end - now > dt.timedelta(seconds=MAX_PRESIGN_S) + MAX_SKEW:
        raise Refused("AuthorizationQueryParametersError", f"the presigned URL is valid until {end:%Y-%m-%d} UTC, "
                      "over 7 days from now; presign again with ExpiresIn of at most 604800")  # fmt: skip
    amz = sorted((k.lower(), v.strip()) for k, v, _ in pairs if k.lower().startswith("x-amz-"))
    amz += [(n, " ".join(v.split())) for n, v in _amz_headers(environ) if n not in dict(amz)]
    custom = "".join(f"{n}:{v}\n" for n, v in sorted(amz))
    sub = sorted((k, v, has) for k, v, has in pairs if k in _V2_SUBRESOURCES)
    resource_query = "&".join(f"{k}={v}" if has else k for k, v, has in sub)
    method = environ.get("REQUEST_METHOD", "GET")
    signature = params.get("Signature", "").encode()
    # Content-Type/MD5 are signed as the client had them: in the request, or moved into the query
    # by the presigner (botocore does that), or absent.
    for md5 in {_header(environ, "content-md5") or "", params.get("content-md5", "")}:
        for ctype in {_header(environ, "content-type") or "", params.get("content-type", ""), ""}:
            for path in _canonical_paths(environ):
                resource = path + ("?" + resource_query if resource_query else "")
                to_sign = f"{method}\n{md5}\n{ctype}\n{expires}\n{custom}{resource}"
                digest = hmac.new(secret.encode(), to_sign.encode(), hashlib.sha1).digest()
                if hmac.compare_digest(base64.b64encode(digest), signature):
                    return
    raise Refused(
        "SignatureDoesNotMatch",
        "the presigned URL's signature does not match: it was changed after presigning, or presigned "
        "with another secret key; presign it again with the stack's credentials (`advflow stack env`)",
    )


def _amz_headers(environ: dict[str, Any]) -> list[tuple[str, str]]:
    return [(k[5:].lower().replace("_", "-"), str(v)) for k, v in environ.items()
            if k.startswith("HTTP_X_AMZ_")]  # fmt: skip


class RequireSignature:
    """WSGI middleware: answer 403 (S3's XML error) unless the request is signed with the stack's key."""

    def __init__(self, app: Callable, credentials: dict[str, str], log: Callable[[str], None] = print):
        self.app = app
        self.key_id = credentials["AWS_ACCESS_KEY_ID"]
        self.secret = credentials["AWS_SECRET_ACCESS_KEY"]
        self.log = log
        self._refusals = 0

    def __call__(self, environ: dict[str, Any], start_response: Callable) -> Iterable[bytes]:
        try:
            verify(environ, self.key_id, self.secret)
        except Refused as exc:
            self._refusals += 1
            if self._refusals <= 20 or self._refusals % 1000 == 0:  # a scan must not fill the disk
                self.log(
                    f"refused {environ.get('REQUEST_METHOD')} {environ.get('PATH_INFO')}: {exc.code} "
                    f"({self._refusals} refused so far)"
                )
            _drain(environ)
            return error_response(start_response, "403 Forbidden", exc.code, str(exc),
                                  head=environ.get("REQUEST_METHOD") == "HEAD")  # fmt: skip
        return self.app(environ, start_response)


def _drain(environ: dict[str, Any]) -> None:
    """Read a refused request's body, so the connection stays in step for the client's next one."""
    stream = environ.get("wsgi.input")
    if stream is None:
        return
    length = environ.get("CONTENT_LENGTH")
    try:
        if length:
            remaining = int(length)
            while remaining > 0 and (chunk := stream.read(min(remaining, 1 << 20))):
                remaining -= len(chunk)
        elif environ.get("wsgi.input_terminated"):
            while stream.read(1 << 20):
                pass
    except (OSError, ValueError):
        pass


def error_response(
    start_response: Callable, status: str, code: str, message: str, head: bool = False
) -> list[bytes]:
    from xml.sax.saxutils import escape

    body = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{code}</Code><Message>{escape(message)}</Message></Error>"
    ).encode()
    start_response(status, [("Content-Type", "application/xml"), ("Content-Length", str(len(body)))])
    return [] if head else [body]
