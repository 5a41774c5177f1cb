"""Who a batch belongs to (the store's `owner` column) and the tenant its items are charged to.

A batch created by a named tenant's request (issue 17) is owned by "tenant:NAME": only that
tenant sees it, its items take that tenant's admission turns and are charged to its rate
limits. Any other owner (a key's SHA-256 on a deployment with anonymous `api_keys_sha256`, or
None on an open deployment) is the anonymous tenant "", which has no limits.
"""

from __future__ import annotations

TENANT_PREFIX = "tenant:"


def tenant_owner(tenant: str) -> str:
    """The owner of the batches a named tenant creates."""
    return TENANT_PREFIX + tenant


def tenant_of(owner: str | None) -> str:
    """The tenant a batch's items are charged to ("": the anonymous one)."""
    if owner is not None and owner.startswith(TENANT_PREFIX):
        return owner.removeprefix(TENANT_PREFIX)
    return ""
