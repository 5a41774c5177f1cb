"""The HTTP layer's limits as data: a leaf module, so that the config (casedesk/config.py) can
name them without importing the server and its sockets."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ServerLimits:
    max_body_bytes: int = 32 * 1024 * 1024
    max_header_bytes: int = 64 * 1024
    max_header_count: int = 128
    max_connections: int = 1024
    header_timeout: float = 10.0
    body_timeout: float = 60.0
    keepalive_timeout: float = 75.0
    write_timeout: float = 60.0  # a client that acknowledges nothing for this long is cut
    # After an answer sent before the request was read: how long and how much to read and
    # discard before closing (see HttpProtocol._linger).
    linger_seconds: float = 5.0
    linger_bytes: int = 64 * 1024 * 1024
    # issue 22: hostile clients.
    max_connections_per_ip: int = 0  # 0: half of max_connections
    allowed_hosts: tuple[str, ...] = ()  # Host names a loopback listener accepts beyond loopback ones

    def per_ip_cap(self) -> int:
        return self.max_connections_per_ip or max(1, self.max_connections // 2)
