"""Who a request belongs to: a key's SHA-256 looked up in one dict, or the identity a trusted
proxy in front set in `[server] identity_header`.

The lookup is by digest, so its timing tells nothing useful about the key itself (finding a
key would need a SHA-256 preimage). Tenant "" is the anonymous one: a deployment's
`api_keys_sha256`, or any key on a deployment that names neither keys nor tenants.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
from collections.abc import Mapping

from casedesk.anthropic.errors import ApiError, authentication_failed
from casedesk.config import Deployment, ServerSettings, Tenant

log = logging.getLogger("casedesk.tenants")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def request_key(headers: Mapping[str, str]) -> str:
    """The API key as the SDKs send it: x-api-key, or Authorization: Bearer (auth_token)."""
    key = headers.get("x-api-key", "")
    if not key:
        scheme, _, token = headers.get("authorization", "").partition(" ")
        key = token.strip() if scheme.lower() == "bearer" else ""
    return key


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()


class Directory:
    """The config's tenants, indexed by key digest and by proxy identity."""

    def __init__(self, tenants: Mapping[str, Tenant], settings: ServerSettings) -> None:
        self.tenants = dict(tenants)
        self._by_key = {digest: t.name for t in tenants.values() for digest in t.keys_sha256}
        self._by_user = {user: t.name for t in tenants.values() for user in t.users}
        self._identity_header = settings.identity_header
        self._trusted: list[Network] = [ipaddress.ip_network(n) for n in settings.trusted_proxies]
        self._warned_untrusted = False

    def identify(self, deployment: Deployment, headers: Mapping[str, str], client: str) -> str:
        """The tenant of a request to `deployment` ("" is anonymous), or a 401 or 403."""
        user = self._proxy_identity(headers, client)
        if user is not None:
            tenant = self._by_user.get(user)
            if tenant is not None:  # the proxy vouched for it: any key is accepted
                return self._allowed(deployment, tenant)
        keyed = bool(deployment.api_keys_sha256 or deployment.tenants)
        if not keyed and not self._by_key:
            return ""  # an open deployment and no tenant keys: no key to look up
        key = request_key(headers)
        if not key:
            if keyed:
                raise authentication_failed("an API key is required: send it as x-api-key or Authorization: Bearer")
            return ""
        digest = key_digest(key)
        if digest in deployment.api_keys_sha256:
            return ""
        tenant = self._by_key.get(digest)
        if tenant is not None and (deployment.tenants or not keyed):
            return self._allowed(deployment, tenant)
        if keyed:
            raise authentication_failed("invalid x-api-key")
        return ""

    def _allowed(self, deployment: Deployment, tenant: str) -> str:
        if deployment.tenants and not deployment.allows(tenant):
            raise ApiError(403, f"tenant {tenant!r} may not use deployment {deployment.id!r}")
        return tenant

    def _proxy_identity(self, headers: Mapping[str, str], client: str) -> str | None:
        if not self._identity_header:
            return None
        value = headers.get(self._identity_header)
        if value is None:
            return None
        if self._trusts(client):
            return value.strip()
        if not self._warned_untrusted:
            self._warned_untrusted = True
            log.warning(
                "ignoring %s from %s: not in [server] trusted_proxies (logged once)", self._identity_header, client
            )
        return None

    def _trusts(self, client: str) -> bool:
        host = client.rpartition(":")[0].strip("[]") if ":" in client else client
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in network for network in self._trusted)
