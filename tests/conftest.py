"""Shared fixtures: the fake llama-server and a CaseDesk gateway on ephemeral ports."""
