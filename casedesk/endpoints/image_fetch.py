"""Image `url` sources, fetched by CaseDesk when `[server] fetch_image_urls = true`, so that
llama-server (which would fetch any URL from the inference box) only ever sees base64.

Bounded and fenced: http and https only, no redirects, at most MAX_IMAGE_BYTES in at most
FETCH_SECONDS, an image media type; the host's addresses are resolved once and the
connection goes to the address that was checked (no DNS rebinding between check and use),
which may not be loopback, private, link-local (the cloud metadata address), multicast or
reserved unless `[server] image_url_allow` lists its network. Any failure is a 400 naming
the block.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import socket
import ssl
from typing import Any
from urllib.parse import urlsplit

import h11

from casedesk.anthropic.errors import ApiError, invalid_request
from casedesk.anthropic.schema import IMAGE_TYPES, MessagesRequest
from casedesk.config import ServerSettings

MAX_IMAGE_BYTES = 5 * 1024 * 1024  # Anthropic's own limit for one image
FETCH_SECONDS = 10.0


async def inline_image_urls(request: MessagesRequest, settings: ServerSettings) -> None:
    """Replace every image `url` source in `request` by the base64 of what it names."""
    for path, source in _url_sources(request.messages):
        media_type, data = await _fetch(source["url"], settings.image_url_allow, path)
        source.clear()
        source.update({"type": "base64", "media_type": media_type, "data": base64.b64encode(data).decode()})


def _url_sources(messages: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    found: list[tuple[str, dict[str, Any]]] = []
    for i, message in enumerate(messages):
        content = message["content"]
        if isinstance(content, str):
            continue
        for j, block in enumerate(content):
            inner = block.get("content") if block["type"] == "tool_result" else None
            blocks = [(f"messages.{i}.content.{j}", block)]
            if isinstance(inner, list):
                blocks += [(f"messages.{i}.content.{j}.content.{k}", b) for k, b in enumerate(inner)]
            for path, item in blocks:
                if item["type"] == "image" and item["source"]["type"] == "url":
                    found.append((f"{path}.source.url", item["source"]))
    return found


def address_allowed(address: str, allow: tuple[str, ...]) -> bool:
    """A public address, or one in a network the operator listed."""
    ip = ipaddress.ip_address(address)
    if any(ip in ipaddress.ip_network(net) for net in allow):
        return True
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return not (
        ip.is_loopback or ip.is_private or ip.is_link_local or ip.is_multicast or ip.is_reserved or ip.is_unspecified
    )


async def _fetch(url: str, allow: tuple[str, ...], path: str) -> tuple[str, bytes]:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise invalid_request(f"{path}: only http and https image URLs are fetched")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        async with asyncio.timeout(FETCH_SECONDS):
            infos = await asyncio.get_running_loop().getaddrinfo(parts.hostname, port, type=socket.SOCK_STREAM)
            addresses = [str(info[4][0]) for info in infos]
            refused = [a for a in addresses if not address_allowed(a, allow)]
            if not addresses or refused:
                raise invalid_request(
                    f"{path}: {parts.hostname} resolves to an address this gateway does not fetch from "
                    f"({', '.join(refused) or 'none'}); [server] image_url_allow can list its network"
                )
            tls = ssl.create_default_context() if parts.scheme == "https" else None
            reader, writer = await asyncio.open_connection(
                addresses[0], port, ssl=tls, server_hostname=parts.hostname if tls else None
            )
            try:
                return await _get(reader, writer, parts.hostname, parts.path or "/", parts.query, path)
            finally:
                writer.close()
    except TimeoutError:
        raise invalid_request(f"{path}: the image did not arrive within {FETCH_SECONDS:g} s") from None
    except (OSError, h11.ProtocolError) as exc:
        raise invalid_request(f"{path}: the image could not be fetched: {exc}") from None


async def _get(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str, target: str, query: str, path: str
) -> tuple[str, bytes]:
    conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=64 * 1024)
    request = h11.Request(
        method="GET",
        target=target + (f"?{query}" if query else ""),
        headers=[("host", host), ("accept", "image/*"), ("connection", "close"), ("user-agent", "casedesk")],
    )
    writer.write(conn.send(request) + conn.send(h11.EndOfMessage()))
    body = bytearray()
    media_type = ""
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await reader.read(65536))
            continue
        if isinstance(event, h11.Response):
            if event.status_code != 200:
                raise invalid_request(
                    f"{path}: the image URL answered HTTP {event.status_code} (redirects are not followed)"
                )
            headers = {name.decode().lower(): value.decode("latin-1") for name, value in event.headers}
            media_type = headers.get("content-type", "").split(";")[0].strip().lower()
            if media_type not in IMAGE_TYPES:
                raise invalid_request(f"{path}: the URL is not an image ({media_type or 'no content-type'})")
        elif isinstance(event, h11.Data):
            body += event.data
            if len(body) > MAX_IMAGE_BYTES:
                raise invalid_request(f"{path}: the image is larger than {MAX_IMAGE_BYTES} bytes")
        elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
            if not media_type:
                raise ApiError(400, f"{path}: the image URL sent no answer")
            return media_type, bytes(body)
