"""A client that leaves mid-stream frees its llama-server slot at once (real server)."""

from __future__ import annotations

import json
import socket
import time
import urllib.request

from tests.e2e.conftest import DEPLOYMENT, MODEL, Rig


def busy_slots(rig: Rig) -> int:
    with urllib.request.urlopen(f"{rig.llama}/slots", timeout=5) as answer:
        return sum(1 for slot in json.loads(answer.read()) if slot.get("is_processing"))


def test_client_disconnect_frees_the_llama_server_slot_within_a_second(rig: Rig) -> None:
    host, port = rig.gateway.removeprefix("http://").split(":")
    body = json.dumps({
        "model": MODEL, "max_tokens": 2000, "stream": True,
        "messages": [{"role": "user", "content": "Write a very long story about the sea."}],
    }).encode()
    head = (
        f"POST /proxy/{DEPLOYMENT}/anthropic/v1/messages HTTP/1.1\r\nhost: {host}\r\n"
        f"anthropic-version: 2023-06-01\r\nx-api-key: k\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\n\r\n"
    ).encode()
    sock = socket.create_connection((host, int(port)))
    sock.sendall(head + body)
    received = b""
    while received.count(b"content_block_delta") < 5:  # tokens are flowing
        chunk = sock.recv(65536)
        assert chunk, received[-500:]
        received += chunk
    assert busy_slots(rig) == 1
    sock.close()
    left_at = time.monotonic()
    while busy_slots(rig) and time.monotonic() - left_at < 5:
        time.sleep(0.05)
    assert busy_slots(rig) == 0
    assert time.monotonic() - left_at < 1.0
