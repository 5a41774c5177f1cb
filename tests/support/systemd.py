"""A real AF_UNIX datagram socket standing in for systemd's notify socket."""

from __future__ import annotations

import socket


class NotifyListener:
    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.sock.settimeout(5)

    def next(self) -> set[str]:
        return set(self.sock.recv(4096).decode().split("\n"))
