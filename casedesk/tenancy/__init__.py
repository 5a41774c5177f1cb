"""Tenancy: who a request belongs to (directory), what it may still use (buckets, limiter) and
when it gets a slot (fairqueue). The decisions are pure cores on an injected `now`; the waiting
is done by casedesk/admission.py."""
