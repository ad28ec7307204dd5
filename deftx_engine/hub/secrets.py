"""The one secret scrubber of the project: every message, log line and traceback that may quote a Hugging Face
token goes through ``scrub`` (the engine's Hub calls, the web app's messages and logs).

It hides secrets, not words: the given secrets exactly, anything shaped like a Hub token, and the value after
``Bearer`` / ``token=`` / ``token:`` only when that value looks like a credential (8+ characters with a digit,
or 24+ characters), so "a token: paste one" stays readable.
"""
from __future__ import annotations

import re

MASK = "***"
_VALUE = r"[^\s'\"&,;()]"
_HUB_TOKEN = re.compile(r"\b(hf_|api_org_)[A-Za-z0-9]{20,}")  # a token, not a name such as hf_hub_download
_CREDENTIAL = re.compile(rf"(?i)(bearer\s+|token\s*[=:]\s*)((?={_VALUE}*\d){_VALUE}{{8,}}|{_VALUE}{{24,}})")


def scrub(text: str, *secrets: str | None) -> str:
    """``text`` without the given secrets (those of 4+ characters), Hub-token-shaped strings and credential
    values after ``Bearer`` / ``token=`` / ``token:``."""
    for secret in secrets:
        if secret and len(secret) >= 4:
            text = text.replace(secret, MASK)
    text = _HUB_TOKEN.sub(lambda m: m.group(1) + MASK, text)
    return _CREDENTIAL.sub(lambda m: m.group(1) + MASK, text)
