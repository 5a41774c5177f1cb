"""What outlives a reload (issue 22 item 10): each deployment's Admission and the tenants'
buckets belong to the process, and a new config only reconfigures them. So the old config's
requests still in flight count against the deployment and their tenant until they end, and a
tenant's usage is not forgotten by a SIGHUP.
"""

from __future__ import annotations

import time

from casedesk.admission import Admission, TenantShare
from casedesk.config import Config, Deployment
from casedesk.tenancy.limiter import Limiter, Limits


class Tenancy:
    def __init__(self) -> None:
        self.admissions: dict[str, Admission] = {}  # by deployment id, kept when it goes away
        self.limiter = Limiter()
        self._shares: dict[str, TenantShare] = {}

    def configure(self, config: Config) -> None:
        """A config (the first or a reload's): the tenants' limits and shares."""
        self._shares = {t.name: TenantShare(t.weight, t.priority, t.max_queue) for t in config.tenants.values()}
        limits = {
            t.name: Limits(t.requests_per_minute, t.input_tokens_per_minute, t.output_tokens_per_minute)
            for t in config.tenants.values()
        }
        self.limiter.configure(limits, time.monotonic())

    def admission(self, deployment: Deployment) -> Admission:
        """The deployment's Admission, configured for this version of the config."""
        admission = self.admissions.get(deployment.id)
        if admission is None:
            admission = self.admissions[deployment.id] = Admission(
                deployment.max_concurrency, deployment.max_queue, deployment.queue_timeout, self._shares
            )
        else:
            admission.configure(
                deployment.max_concurrency, deployment.max_queue, deployment.queue_timeout, self._shares
            )
        return admission
