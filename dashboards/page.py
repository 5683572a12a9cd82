"""What the project's HTML reports share: the page frame's CSS, escaping, the n/a mark.

Each report (`sweep_report`, `reproduce_report`) adds its own CSS after `BASE_CSS`."""

from __future__ import annotations

import html
from typing import Any

BASE_CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0; color: #1d2330;
       background: #f5f6f8; }
main { max-width: 1280px; margin: 0 auto; padding: 16px 24px 48px; }
header { background: #1d2330; color: #fff; padding: 20px 24px; }
header h1 { margin: 0 0 6px; font-size: 22px; }
header .meta span { margin-right: 18px; }
header code { background: #323a4d; padding: 1px 5px; border-radius: 3px; }
section { background: #fff; border-radius: 6px; padding: 12px 18px; margin-top: 18px;
          box-shadow: 0 1px 2px rgba(0,0,0,.08); }
h2 { font-size: 17px; margin: 4px 0 10px; }
.na { color: #aab0bc; }
.table-wrap { overflow-x: auto; }
.gallery { display: flex; flex-wrap: wrap; gap: 14px; }
figure.grid { margin: 0; width: 270px; }
figure.grid img { width: 100%; image-rendering: pixelated; border: 1px solid #e3e6eb; }
figure.grid .placeholder { width: 100%; aspect-ratio: 1; display: flex; align-items: center;
    justify-content: center; text-align: center; background: #f5f6f8; color: #6b7385;
    border: 1px dashed #c3c8d2; font-size: 12px; padding: 8px; box-sizing: border-box; word-break: break-all; }
figcaption { font-size: 13px; margin-top: 4px; }
footer { color: #8a91a0; font-size: 12px; margin-top: 24px; }
"""


def esc(value: Any) -> str:
    """HTML-escaped text of any value (quotes too: safe inside attributes)."""
    return html.escape(str(value), quote=True)


def na() -> str:
    """The mark for a value that does not exist."""
    return '<span class="na">&mdash;</span>'
