"""Bearer tokens: configured as sha256 hashes, each with a name and a role.

The settings never hold a token, only ``sha256(token)`` in hex; a presented token is
hashed and compared with every configured hash in constant time. Roles are ordered:
an ``auditor`` may read everything a ``viewer`` may, plus the audit trail. A ``sender``
stands apart: it may store by STOW-RS and nothing else, and only it may store.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import secrets
from collections.abc import Iterable
from dataclasses import dataclass

from gastrolens.config.schema import APIToken

MAX_TOKEN_LENGTH = 512
"""Longer presented tokens are refused before hashing."""


class Role(str, enum.Enum):
    VIEWER = "viewer"
    AUDITOR = "auditor"
    SENDER = "sender"
    """Stores instances by STOW-RS and reads nothing; no other role may store."""

    def grants(self, needed: Role) -> bool:
        return self is needed or (self is Role.AUDITOR and needed is Role.VIEWER)


@dataclass(frozen=True)
class Principal:
    """Who presented a valid token: its configured name and role."""

    name: str
    role: Role

    @property
    def actor(self) -> str:
        """The audit trail's actor for reads made with this token."""
        return f"api:{self.name}"


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def new_token() -> str:
    """A fresh random token (256 bits, URL-safe)."""
    return secrets.token_urlsafe(32)


def token_table(name: str, role: Role, token: str) -> str:
    """The ``[[api.tokens]]`` TOML table that admits ``token``."""
    return f'[[api.tokens]]\nname = "{name}"\nrole = "{role.value}"\nsha256 = "{hash_token(token)}"\n'


class TokenRegistry:
    """The configured tokens; :meth:`identify` maps a presented token to its principal."""

    def __init__(self, tokens: Iterable[APIToken]) -> None:
        self._entries = [(t.sha256, Principal(t.name, Role(t.role))) for t in tokens]

    def __len__(self) -> int:
        return len(self._entries)

    def identify(self, token: str | None) -> Principal | None:
        if not token or len(token) > MAX_TOKEN_LENGTH:
            return None
        digest = hash_token(token)
        found = None
        for expected, principal in self._entries:  # no early exit: every hash is compared
            if hmac.compare_digest(expected, digest):
                found = principal
        return found
