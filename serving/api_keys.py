"""End-user API keys (``LIVELOOP_API_KEYS``) and the identity each stands for.

Only a SHA-256 digest of each key is kept, and a presented key is compared against every one of them with
``hmac.compare_digest``: the time an answer takes tells nothing about how much of a key was right. A key
configured without a ``user:`` name is known by a digest of the whole key, so no characters of a key are ever
stored with completions or published with ratings, and two keys with a common prefix stay two users.
"""

from __future__ import annotations

import hashlib
import hmac


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def key_identity(key: str) -> str:
    """The user a key without a configured name stands for (stable across restarts and replicas)."""
    return f"key-{hashlib.sha256(b'liveloop-user:' + key.encode()).hexdigest()[:16]}"


class ApiKeys:
    def __init__(self, entries: list[str]):
        """``entries`` as the setting holds them (validated there): each ``user:key`` or a bare ``key``."""
        self._users: list[tuple[bytes, str]] = []
        for entry in entries:
            user, sep, key = entry.partition(":")
            self._users.append((_digest(key), user) if sep else (_digest(entry), key_identity(entry)))

    def __bool__(self) -> bool:
        """Whether keys are configured at all (no keys: the API is open)."""
        return bool(self._users)

    def identify(self, token: str) -> str | None:
        """The user of ``token``, or None when it is no configured key. Every digest is compared, match or not."""
        presented = _digest(token)
        found = None
        for digest, user in self._users:
            if hmac.compare_digest(presented, digest):
                found = user
        return found
