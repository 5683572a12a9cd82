"""Secrets that must never reach MLflow: `secret_values` finds them, `scrub` masks them.

Params, tags and artifacts pass through `scrub`, which masks the values of secret-looking
environment variables (AWS keys, the Ray token, anything named *SECRET*/*TOKEN*/*PASSWORD*...)
and credentials embedded in URLs; the worker environment itself is never logged.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Iterable

_SECRET_NAME = re.compile(r"SECRET|TOKEN|PASSW|CREDENTIAL|PRIVATE|API_?KEY|ACCESS_KEY|AUTH", re.I)
_URL_USERINFO = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)[^/@\s:]+(:[^/@\s]*)?@", re.I)
MASK = "***"


def secret_values(environ: dict[str, str] | None = None) -> list[str]:
    """Values that must never be logged: secret-named environment variables and the Ray token."""
    env = os.environ if environ is None else environ
    values = {v for k, v in env.items() if _SECRET_NAME.search(k) and len(v) >= 4}
    token_path = env.get("RAY_AUTH_TOKEN_PATH")
    if token_path and os.path.isfile(token_path):
        try:
            values.add(Path(token_path).read_text().strip())
        except OSError:
            pass
    values.discard("")
    return sorted(values, key=len, reverse=True)  # longest first: a secret containing another


def redact_url(text: str) -> str:
    """`text` with the credentials of every URL in it masked (scheme://***@host...): for URLs that
    are printed or used as keys, e.g. a sweep's PostgreSQL storage. Deterministic (unlike `scrub`,
    it does not depend on the environment), so a masked URL can key a run found again later."""
    return _URL_USERINFO.sub(lambda m: f"{m.group('scheme')}{MASK}@", text)


def scrub(value: Any, secrets: Iterable[str] | None = None) -> Any:
    """Mask secret values and URL credentials inside strings (recursing into dicts and lists)."""
    secrets = secret_values() if secrets is None else list(secrets)
    if isinstance(value, dict):
        return {k: scrub(v, secrets) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(scrub(v, secrets) for v in value)
    if not isinstance(value, str):
        return value
    out = redact_url(value)
    for s in secrets:
        out = out.replace(s, MASK)
    return out
