"""The chat page at ``/`` (one static HTML file) and the security headers it is served with."""

from __future__ import annotations

import base64
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

__all__ = ["ChatPage"]

STATIC_DIR = Path(__file__).parent / "static"


def _inline_hashes(html: str, tag: str) -> str:
    blocks = re.findall(rf"<{tag}[^>]*>(.*?)</{tag}>", html, flags=re.S)
    hashes = [f"'sha256-{base64.b64encode(hashlib.sha256(b.encode()).digest()).decode()}'" for b in blocks]
    return " ".join(hashes) or "'none'"


@dataclass(frozen=True)
class ChatPage:
    html: str
    headers: dict[str, str]

    @classmethod
    def load(cls) -> ChatPage:
        html = (STATIC_DIR / "index.html").read_text(encoding="utf-8")
        # The page's inline script and style are allowed by hash only: no other script can run on it.
        csp = (
            f"default-src 'none'; script-src {_inline_hashes(html, 'script')}; "
            f"style-src {_inline_hashes(html, 'style')}; img-src 'self' data: blob:; media-src data:; connect-src 'self'; "
            "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
        )
        headers = {
            "Content-Security-Policy": csp,
            "X-Content-Type-Options": "nosniff",
            "X-Frame-Options": "DENY",
            "Referrer-Policy": "no-referrer",
            "Cache-Control": "no-store",
        }
        return cls(html, headers)
