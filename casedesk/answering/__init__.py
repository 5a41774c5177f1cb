"""Answering one checked Messages request on a deployment: the part POST …/v1/messages and a
batch item share, below both the endpoints and the batches (docs/design.md, "Rooms and doors")."""
