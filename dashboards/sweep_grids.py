"""Fetch a trial's sample-grid image bytes from wherever the sweep left it.

A trial records its grid as the user attribute `sample_grid`: a URI that may be
- a local path (or `file://` URI),
- an `s3://bucket/key` URI (read through `advflow.platform.data.storage.Storage`, so the standard
  `AWS_ENDPOINT_URL_S3` / `AWS_ENDPOINT_URL` overrides apply, as everywhere else in advflow),
- an MLflow artifact URI (`runs:/<run_id>/<path>`, `mlflow-artifacts:/...`, `models:/...`), fetched
  with `mlflow.artifacts.download_artifacts` against the current tracking URI (`MLFLOW_TRACKING_URI`),
- any other `scheme://` URI fsspec can open.

Every failure surfaces as `GridUnavailable` with a message that says what was tried, so the report
can show a placeholder instead of crashing.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

SAMPLE_GRID_ATTR = "sample_grid"

# Reports are built on demand; a dead endpoint should cost seconds, not the storage layer's default
# worst case (five attempts with 60 s read timeouts).
_READ_ATTEMPTS = 2
_CONNECT_TIMEOUT_S = 5.0
_READ_TIMEOUT_S = 30.0

_MLFLOW_SCHEMES = ("runs:", "mlflow-artifacts:", "models:")

# Magic numbers of the image formats browsers decode from a data URI.
_IMAGE_SIGNATURES: tuple[tuple[bytes, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
)


class GridUnavailable(OSError):
    """The grid could not be read or is not an image; the message names the URI and the reason."""


def image_mime(data: bytes) -> str | None:
    """MIME type of `data` judged by its leading bytes, or None when it is no browser image format."""
    for magic, mime in _IMAGE_SIGNATURES:
        if data.startswith(magic):
            return mime
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return None


def load_grid(uri: str) -> bytes:
    """Bytes of the image at `uri` (see module doc for the accepted forms).

    Raises GridUnavailable when it cannot be read; the bytes are not checked here (`image_mime`).
    """
    if not isinstance(uri, str) or not uri.strip():
        raise GridUnavailable(f"{SAMPLE_GRID_ATTR}={uri!r} is not a URI or path")
    uri = uri.strip()
    try:
        if uri.startswith(_MLFLOW_SCHEMES):
            return _read_mlflow(uri)
        scheme, sep, rest = uri.partition("://")
        if not sep:
            return Path(uri).expanduser().read_bytes()
        if scheme == "file":
            return Path(rest).read_bytes()
        if scheme in ("s3", "s3a"):
            return _read_s3(uri)
        import fsspec

        with fsspec.open(uri, "rb") as f:
            return f.read()
    except GridUnavailable:
        raise
    except Exception as e:  # any backend failure becomes a placeholder, named
        raise GridUnavailable(f"cannot read {uri}: {type(e).__name__}: {e}") from e


def _read_s3(uri: str) -> bytes:
    from advflow.platform.data.storage import RetryPolicy, Storage

    parent, _, name = uri.rstrip("/").rpartition("/")
    if not name or parent.endswith(":/"):
        raise GridUnavailable(f"{uri} names no object: use s3://bucket/path/to/grid.png")
    retry = RetryPolicy(attempts=_READ_ATTEMPTS, connect_timeout=_CONNECT_TIMEOUT_S,
                        read_timeout=_READ_TIMEOUT_S)
    return Storage(parent, retry=retry).read(name)


def _read_mlflow(uri: str) -> bytes:
    import mlflow.artifacts

    with tempfile.TemporaryDirectory(prefix="advflow-grid-") as tmp:
        local = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=tmp)
        if os.path.isdir(local):
            raise GridUnavailable(f"{uri} is an artifact directory, not an image file")
        return Path(local).read_bytes()
