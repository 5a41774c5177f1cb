"""Operations: metrics, access log, readiness, sd_notify, socket activation, reload, the unit."""

from __future__ import annotations

import asyncio
import configparser
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import anthropic
import orjson
import pytest

from casedesk.config import load
from casedesk.ops.systemd import Notifier, listen_fds
from tests.conftest import GatewayFactory, RunningGateway, gateway_config
from tests.fake_llama import FakeLlamaServer, Reply
from tests.support.systemd import NotifyListener
from tests.support.wait import until
from tests.support.wire import exchange, get, parse

ROOT = Path(__file__).resolve().parents[1]
ASK = [{"role": "user", "content": "a secret question"}]


async def known_traffic(gateway: RunningGateway, fake: FakeLlamaServer) -> None:
    client = anthropic.AsyncAnthropic(base_url=gateway.base_url(), api_key="sk-very-secret", max_retries=0)
    fake.replies.extend([Reply(tokens=["a", "b", "c"], prompt_tokens=10), Reply(tokens=["x", "y"], prompt_tokens=7)])
    await client.messages.create(model="m", max_tokens=10, messages=ASK)
    async with client.messages.stream(model="m", max_tokens=10, messages=ASK) as stream:
        await stream.get_final_message()
    with pytest.raises(anthropic.NotFoundError):
        await client.messages.create(model="nope", max_tokens=10, messages=ASK)


async def test_metrics_after_known_traffic(fake: FakeLlamaServer, start_gateway: GatewayFactory) -> None:
    gw = await start_gateway(gateway_config([fake.url], server={"access_log": ""}))
    await known_traffic(gw, fake)
    status, body = await get(gw, "/metrics")
    text = body.decode()
    assert status == 200
    assert 'casedesk_requests_total{deployment="dep",model="m",status="200"} 2' in text
    assert 'casedesk_requests_total{deployment="dep",model="",status="404"} 1' in text
    assert 'casedesk_input_tokens_total{deployment="dep",model="m"} 17' in text
    assert 'casedesk_output_tokens_total{deployment="dep",model="m"} 5' in text
    assert 'casedesk_time_to_first_token_seconds_count{deployment="dep",model="m"} 1' in text
    assert 'casedesk_inter_token_seconds_count{deployment="dep",model="m"} 1' in text
    assert 'casedesk_request_duration_seconds_count{deployment="dep",model="m"} 2' in text
    assert 'casedesk_in_flight_requests{deployment="dep"} 0' in text
    assert f'casedesk_upstream_up{{deployment="dep",model="m",upstream="127.0.0.1:{fake.port}"}} 1' in text


async def test_access_log_lines_after_known_traffic(
    fake: FakeLlamaServer, start_gateway: GatewayFactory, tmp_path: Path
) -> None:
    log = tmp_path / "access.log"
    gw = await start_gateway(gateway_config([fake.url], server={"access_log": str(log)}))
    await known_traffic(gw, fake)
    raw = log.read_bytes()
    lines = [orjson.loads(line) for line in raw.splitlines()]
    assert [(r["status"], r["stream"], r["model"]) for r in lines] == [
        (200, False, "m"),
        (200, True, "m"),
        (404, False, "nope"),
    ]
    plain, streamed = lines[0], lines[1]
    assert (plain["input_tokens"], plain["output_tokens"]) == (10, 3)
    assert (streamed["input_tokens"], streamed["output_tokens"]) == (7, 2)
    assert streamed["ttft_ms"] is not None and streamed["ttft_ms"] <= streamed["duration_ms"]
    assert plain["upstream"] == f"127.0.0.1:{fake.port}" and plain["deployment"] == "dep"
    assert plain["request_id"].startswith("req_") and plain["time"].endswith("Z")
    assert b"sk-very-secret" not in raw and b"secret question" not in raw  # no keys, no contents


async def test_request_id_header_matches_the_access_log(
    fake: FakeLlamaServer, start_gateway: GatewayFactory, tmp_path: Path
) -> None:
    log = tmp_path / "access.log"
    gw = await start_gateway(gateway_config([fake.url], server={"access_log": str(log)}))
    _, headers, _ = parse(await exchange(gw.port, b"GET /proxy/dep/anthropic/v1/models HTTP/1.1\r\nhost: x\r\n\r\n"))
    assert orjson.loads(log.read_bytes().splitlines()[-1])["request_id"] == headers["request-id"]


async def test_readyz_follows_upstream_health(fake: FakeLlamaServer, start_gateway: GatewayFactory) -> None:
    good = await start_gateway(gateway_config([fake.url]))
    assert (await get(good, "/readyz"))[0] == 200
    bad = await start_gateway(gateway_config(["http://127.0.0.1:9"]))
    await until(lambda: readyz_is(bad, 503), timeout=3, what="/readyz to see the dead upstream")
    status, body = await get(bad, "/readyz")
    assert status == 503 and orjson.loads(body)["type"] == "error"


async def readyz_is(gateway: RunningGateway, status: int) -> bool:
    return (await get(gateway, "/readyz"))[0] == status


def test_notify_messages_reach_a_datagram_socket(tmp_path: Path) -> None:
    listener = NotifyListener(str(tmp_path / "notify"))
    notifier = Notifier({"NOTIFY_SOCKET": str(tmp_path / "notify"), "WATCHDOG_USEC": "4000000"})
    notifier.ready("listening")
    assert listener.next() == {"READY=1", "STATUS=listening"}
    notifier.reloading()
    message = listener.next()
    assert "RELOADING=1" in message and any(m.startswith("MONOTONIC_USEC=") for m in message)
    notifier.stopping()
    assert "STOPPING=1" in listener.next()
    assert notifier.watchdog_interval == 2.0


def test_notify_abstract_namespace_and_no_socket(tmp_path: Path) -> None:
    name = f"casedesk-test-{os.getpid()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(5)
    Notifier({"NOTIFY_SOCKET": "@" + name}).notify("WATCHDOG=1")
    assert sock.recv(100) == b"WATCHDOG=1"
    silent = Notifier({})
    assert not silent.address
    silent.ready("nothing happens")  # no socket: a no-op, no error


async def test_watchdog_pings_at_half_the_interval(tmp_path: Path) -> None:
    listener = NotifyListener(str(tmp_path / "notify"))
    notifier = Notifier({"NOTIFY_SOCKET": str(tmp_path / "notify"), "WATCHDOG_USEC": "200000"})
    notifier.start_watchdog()
    try:
        listener.sock.setblocking(False)
        seen = 0
        deadline = time.monotonic() + 2
        while seen < 3 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
            try:
                while listener.sock.recv(100) == b"WATCHDOG=1":
                    seen += 1
            except BlockingIOError:
                pass
        assert seen >= 3
    finally:
        notifier.stop_watchdog()


async def test_service_notifies_ready_reload_and_stopping(
    fake: FakeLlamaServer, start_gateway: GatewayFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    listener = NotifyListener(str(tmp_path / "notify"))
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
    config = tmp_path / "casedesk.toml"
    config.write_text(f'[server]\naccess_log = ""\n[deployments.dep.models.m]\nupstreams = ["{fake.url}"]\n')
    gw = await start_gateway(load(config))
    assert "READY=1" in await asyncio.to_thread(listener.next)
    gw.reload.set()
    assert "RELOADING=1" in await asyncio.to_thread(listener.next)
    assert "READY=1" in await asyncio.to_thread(listener.next)
    await gw.shutdown()
    assert "STOPPING=1" in await asyncio.to_thread(listener.next)


async def test_reload_applies_to_new_requests_while_a_stream_finishes_on_the_old(
    fake: FakeLlamaServer, start_gateway: GatewayFactory, tmp_path: Path
) -> None:
    config = tmp_path / "casedesk.toml"
    config.write_text(f'[server]\naccess_log = ""\n[deployments.dep.models.m]\nupstreams = ["{fake.url}"]\n')
    gw = await start_gateway(load(config))
    client = anthropic.AsyncAnthropic(base_url=gw.base_url(), api_key="k", max_retries=0)
    fake.replies.append(Reply(tokens=[f"t{i}" for i in range(40)], token_delay=0.02))
    streaming = asyncio.ensure_future(client.messages.create(model="m", max_tokens=100, messages=ASK))
    await until(lambda: fake.chat_requests() and fake.chat_requests()[-1].status == 200, what="the stream to begin")
    config.write_text(
        f'[server]\naccess_log = ""\n[deployments.dep.models.m]\nupstreams = ["{fake.url}"]\n'
        f'[deployments.dep.models.m2]\nupstreams = ["{fake.url}"]\n'
    )
    gw.reload.set()

    async def both_models_listed() -> bool:
        return [m.id async for m in client.models.list()] == ["m", "m2"]

    await until(both_models_listed, timeout=5, what="the reload to list m2")
    message = await streaming
    assert message.content[0].text == "".join(f"t{i}" for i in range(40))  # the old config finished it
    # A broken config is refused; the running one stays.
    config.write_text("[server]\nlisten = 5\n")
    gw.reload.set()
    await until(lambda: not gw.reload.is_set(), what="the reload to be refused")  # cleared, then refused at once
    assert [m.id async for m in client.models.list()] == ["m", "m2"]


def test_socket_activation_serves_on_the_passed_socket(tmp_path: Path) -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    port = listener.getsockname()[1]
    config = tmp_path / "casedesk.toml"
    config.write_text(
        '[server]\nlisten = "127.0.0.1:1"\naccess_log = ""\n[deployments.d.models.m]\nupstreams = ["http://127.0.0.1:9"]\n'
    )
    fd = listener.fileno()
    child = subprocess.Popen(
        ["sh", "-c", f'LISTEN_PID=$$ LISTEN_FDS=1 exec "{sys.executable}" -m casedesk serve --config "{config}"'],
        pass_fds=[3],
        preexec_fn=lambda: os.dup2(fd, 3),
        cwd=ROOT,  # noqa: PLW1509
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as answer:
                    assert answer.status == 200
                    break
            except OSError:
                assert time.monotonic() < deadline and child.poll() is None
                time.sleep(0.1)
    finally:
        child.terminate()
        child.wait(10)
        listener.close()
    assert listen_fds({"LISTEN_FDS": "1", "LISTEN_PID": "1"}) == []  # not for us: ignored


def test_unit_file_is_valid_and_sandboxed(tmp_path: Path) -> None:
    unit = (ROOT / "contrib" / "systemd" / "casedesk.service").read_text()
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(unit)
    service = parser["Service"]
    assert service["Type"] == "notify" and service["WatchdogSec"] and "HUP" in service["ExecReload"]
    assert service["Restart"] == "on-failure"
    assert (
        service["DynamicUser"] == "yes" and service["ProtectSystem"] == "strict" and service["NoNewPrivileges"] == "yes"
    )
    assert "AF_INET" in service["RestrictAddressFamilies"]  # it must reach its upstreams
    # A managed llama-server must see the GPUs (README, "Running under systemd"): no PrivateDevices, a closed device
    # policy opened for CUDA, ROCm and Vulkan's device classes only.
    assert service["PrivateDevices"] == "no" and service["DevicePolicy"] == "closed"
    allowed = [line.split("=", 1)[1] for line in unit.splitlines() if line.startswith("DeviceAllow=")]
    assert allowed == [f"char-{c} rw" for c in ("nvidia-frontend", "nvidia-uvm", "nvidia-caps", "drm", "kfd")]
    analyze = shutil.which("systemd-analyze")
    if analyze:  # where systemd is installed, it must accept the unit as written
        binary = ROOT / ".venv" / "bin" / "casedesk"
        copy = tmp_path / "casedesk.service"
        copy.write_text(
            unit.replace("/opt/casedesk/.venv/bin/casedesk", str(binary if binary.exists() else sys.executable))
        )
        run = subprocess.run([analyze, "verify", str(copy)], capture_output=True, text=True, timeout=60)
        problems = [line for line in (run.stdout + run.stderr).splitlines() if "casedesk.service" in line]
        assert run.returncode == 0 and not problems, run.stdout + run.stderr
