"""API key → tenant.  No key means the default tenant unless keys are required."""

from __future__ import annotations

import hmac

from ragline.config import ServerSettings
from ragline.errors import Forbidden, Unauthorized
from ragline.types import DEFAULT_TENANT


class Auth:
    def __init__(self, settings: ServerSettings) -> None:
        self._keys = dict(settings.api_keys)
        self._admin = list(settings.admin_keys)
        self._admin_bytes = [a.encode("utf-8", "surrogateescape") for a in self._admin]
        self._required = settings.require_api_key

    @staticmethod
    def key_from_headers(authorization: str | None, x_api_key: str | None) -> str | None:
        if x_api_key:
            return x_api_key
        if authorization and authorization[:7].lower() == "bearer ":
            return authorization[7:].strip() or None
        return None

    def tenant(self, key: str | None) -> str:
        """The tenant for a key; unknown keys are refused (never silently mapped to default)."""
        if key is None:
            if self._required:
                raise Unauthorized("an API key is required: send 'Authorization: Bearer <key>'")
            return DEFAULT_TENANT
        tenant = self._keys.get(key)
        if tenant is None:
            if self.is_admin(key):
                return DEFAULT_TENANT
            raise Unauthorized("unknown API key")
        return tenant

    def is_admin(self, key: str) -> bool:
        """Constant-time comparison over UTF-8 bytes (``compare_digest`` refuses non-ASCII ``str``)."""
        raw = key.encode("utf-8", "surrogateescape")
        return any(hmac.compare_digest(raw, a) for a in self._admin_bytes)

    def require_admin(self, key: str | None) -> None:
        if key is None:
            raise Unauthorized("this endpoint needs an admin API key")
        if not self.is_admin(key):
            raise Forbidden("this API key is not an admin key")
