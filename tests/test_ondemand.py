"""Models on demand (issue 10) and the supervisor's state machine, over real sockets with a
fake llama-server *binary* (tests/fake_llama_binary.py): lazy start, TTL stop, LRU eviction,
in-flight never cut, the thrash bound, failed loads, and no process left behind."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

import anthropic
import pytest

from casedesk.config import parse
from casedesk.ops.process import State, is_valid_transition
from casedesk.ops.supervisor import Supervisor
from tests.conftest import GatewayFactory, RunningGateway
from tests.support.systemd import NotifyListener
from tests.support.toml import to_toml
from tests.support.wait import until
from tests.support.wire import get

ROOT = Path(__file__).resolve().parents[1]
ASK = [{"role": "user", "content": "hi"}]
ANSWER = " tok0 tok1 tok2"


class Box:
    """A tmp dir with a fake binary, a model file and a record of every process started."""

    def __init__(self, tmp_path: Path) -> None:
        self.binary = tmp_path / "llama-server"
        self.binary.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{ROOT / "tests" / "fake_llama_binary.py"}" "$@"\n')
        self.binary.chmod(0o755)
        self.model = tmp_path / "model.gguf"
        self.model.write_bytes(b"GGUF fake")
        self.starts = tmp_path / "starts.txt"
        self.starts.touch()
        self.state = tmp_path / "state"

    def spec(self, *fake_args: str, **keys: Any) -> dict[str, Any]:
        args = ["-t", "1", "--fake-starts", str(self.starts), *fake_args]
        return {"llama_server": {"model": str(self.model), "binary": str(self.binary), "args": args, **keys}}

    def config(self, models: dict[str, dict[str, Any]], max_loaded: int = 0, **deployment: Any) -> dict[str, Any]:
        server = {
            "listen": "127.0.0.1:0",
            "health_interval": 0.2,
            "access_log": "",
            "max_loaded_models": max_loaded,
            "state_dir": str(self.state),
        }
        dep = {"max_concurrency": 64, "max_queue": 64, "queue_timeout": 30, **deployment}
        return {"server": server, "deployments": {"dep": {**dep, "models": models}}}

    def pids(self) -> list[int]:
        return [int(line.split()[0]) for line in self.starts.read_text().split("\n") if line]

    def running(self) -> list[int]:
        return [pid for pid in self.pids() if alive(pid)]


def alive(pid: int) -> bool:
    """Without psutil: signal 0 checks that the process exists (a reaped one does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return not Path(f"/proc/{pid}/stat").read_text().split(") ")[-1].startswith("Z")


def client(gw: RunningGateway) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(base_url=gw.base_url(), api_key="k", max_retries=0, timeout=60)


async def ask(gw: RunningGateway, model: str) -> str:
    message = await client(gw).messages.create(model=model, max_tokens=10, messages=ASK)
    return message.content[0].text  # type: ignore[union-attr]


async def metrics(gw: RunningGateway) -> str:
    status, body = await get(gw, "/metrics")
    assert status == 200
    return body.decode()


def value(text: str, name: str, **labels: str) -> float:
    """One sample of /metrics; labels given must all match (others are ignored)."""
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            found = dict(re.findall(r'(\w+)="([^"]*)"', line.split(" ")[0]))
            if all(found.get(k) == v for k, v in labels.items()):
                return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no {name}{labels} in /metrics")


async def state(gw: RunningGateway, model: str) -> str:
    text = await metrics(gw)
    states = [s.value for s in State if s is not State.SHUTDOWN]
    (current,) = [s for s in states if value(text, "casedesk_model_state", model=model, state=s) == 1]
    return current


async def wait_state(gw: RunningGateway, model: str, wanted: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while (current := await state(gw, model)) != wanted:
        assert time.monotonic() < deadline, f"{model} stayed {current}, never {wanted}"
        await asyncio.sleep(0.05)


async def wait_metric(gw: RunningGateway, name: str, wanted: float, **labels: str) -> None:
    deadline = time.monotonic() + 15
    while value(await metrics(gw), name, **labels) != wanted:
        assert time.monotonic() < deadline, f"{name}{labels} never became {wanted}"
        await asyncio.sleep(0.02)


@pytest.fixture
def box(tmp_path: Path) -> Any:
    box = Box(tmp_path)
    yield box
    # Whatever a test did, every process it started is gone once its gateway stopped.
    leftover = box.running()
    for pid in leftover:
        os.kill(pid, 9)
    assert not leftover, f"llama-server processes left behind: {leftover}"


async def stopped(gw: RunningGateway) -> None:
    await gw.shutdown()


def test_transitions_follow_llama_swap_process_states() -> None:
    allowed = {(a, b) for a in State for b in State if is_valid_transition(a, b)}
    assert allowed == {
        (State.STOPPED, State.STARTING),
        (State.STOPPED, State.SHUTDOWN),
        (State.STARTING, State.READY),
        (State.STARTING, State.STOPPING),  # a failed start goes through stopping
        (State.READY, State.STOPPING),
        (State.STOPPING, State.STOPPED),
        (State.STOPPING, State.SHUTDOWN),
    }


async def test_preload_false_starts_on_the_first_request_and_ttl_stops_it(
    box: Box, start_gateway: GatewayFactory
) -> None:
    gw = await start_gateway(parse(box.config({"a": box.spec(preload=False, ttl=0.5)})))
    assert box.pids() == []  # nothing started at boot
    assert await state(gw, "a") == "stopped"
    assert (await get(gw, "/readyz"))[0] == 200  # stopped on demand is not "not ready"

    # Several requests arrive while it is stopped: one load serves them all.
    answers = await asyncio.gather(*(ask(gw, "a") for _ in range(5)))
    assert answers == [ANSWER] * 5
    assert len(box.pids()) == 1
    text = await metrics(gw)
    assert value(text, "casedesk_model_loads_total", model="a", result="ok") == 1
    assert value(text, "casedesk_model_load_seconds_count", model="a") == 1
    # Health checks (one at boot, then every 0.2 s) left the stopped server alone: its first
    # requests were not refused, and it never counted as failing.
    assert value(text, "casedesk_upstream_errors", model="a") == 0
    assert value(text, "casedesk_upstream_up", model="a") == 1

    # Idle past its ttl: stopped, the process gone; the next request loads it again.
    await wait_state(gw, "a", "stopped")
    assert box.running() == []
    assert value(await metrics(gw), "casedesk_model_evictions_total", model="a", reason="ttl") == 1
    assert (await get(gw, "/readyz"))[0] == 200
    assert await ask(gw, "a") == ANSWER
    assert len(box.pids()) == 2
    await stopped(gw)


async def test_lru_eviction_stops_the_least_recently_used_idle_model(box: Box, start_gateway: GatewayFactory) -> None:
    models = {tag: box.spec(preload=False) for tag in ("a", "b", "c")}
    gw = await start_gateway(parse(box.config(models, max_loaded=2)))
    assert await ask(gw, "a") == ANSWER
    assert await ask(gw, "b") == ANSWER
    assert await ask(gw, "a") == ANSWER  # a is now more recent than b
    assert await ask(gw, "c") == ANSWER
    assert [await state(gw, m) for m in "abc"] == ["ready", "stopped", "ready"]
    text = await metrics(gw)
    assert value(text, "casedesk_model_evictions_total", model="b", reason="lru") == 1
    assert value(text, "casedesk_model_evictions_total", model="a", reason="lru") == 0
    assert len(box.running()) == 2
    await stopped(gw)


async def test_a_stream_in_flight_is_never_cut_by_a_swap(box: Box, start_gateway: GatewayFactory) -> None:
    slow = box.spec("--fake-tokens", "20", "--fake-token-delay", "0.05", preload=False)
    gw = await start_gateway(parse(box.config({"a": slow, "b": box.spec(preload=False)}, max_loaded=1)))
    events: list[str] = []
    async with client(gw).messages.stream(model="a", max_tokens=30, messages=ASK) as stream:
        first = True
        swap: asyncio.Task[str] | None = None
        async for event in stream:
            if event.type == "content_block_delta" and first:
                first = False
                swap = asyncio.create_task(ask(gw, "b"))  # needs a's memory: must wait
                await wait_metric(gw, "casedesk_model_waiting_requests", 1, model="b")
            events.append(event.type)
        message = await stream.get_final_message()
        events.append("done")
    assert swap is not None and not swap.done()  # b waited for a's stream to end
    assert message.stop_reason == "end_turn" and len(message.content[0].text.split()) == 20  # type: ignore[union-attr]
    assert events[-2:] == ["message_stop", "done"]
    assert await swap == ANSWER
    assert [await state(gw, m) for m in "ab"] == ["stopped", "ready"]
    assert value(await metrics(gw), "casedesk_model_evictions_total", model="a", reason="lru") == 1
    await stopped(gw)


async def test_the_thrash_bound(box: Box, start_gateway: GatewayFactory, capsys: pytest.CaptureFixture[str]) -> None:
    """4 clients, 40 requests alternating between two models, max_loaded_models = 1: at most 6
    loads, no request lost, each request's wait bounded (ops/scheduler.py's docstring, exactly
    in tests/test_scheduler.py; here on real sockets, with slack for a busy box)."""
    load, request = 0.3, 0.15  # the fake: 0.3 s to healthy; 3 tokens 0.05 s apart
    spec = ["--fake-load-seconds", str(load), "--fake-token-delay", "0.05"]
    models = {"a": box.spec(*spec, preload=False), "b": box.spec(*spec, preload=False)}
    gw = await start_gateway(parse(box.config(models, max_loaded=1)))
    latencies: list[float] = []

    async def one(model: str) -> str:
        began = time.monotonic()
        answer = await ask(gw, model)
        latencies.append(time.monotonic() - began)
        return answer

    async def agent(index: int) -> list[str]:
        # An agent's background calls: one every 200 ms, not waiting for the previous answer.
        calls = []
        for i in range(10):
            calls.append(asyncio.create_task(one("ab"[(index + i) % 2])))
            await asyncio.sleep(0.2)
        return await asyncio.gather(*calls)

    began = time.monotonic()
    answers = [a for batch in await asyncio.gather(*(agent(i) for i in range(4))) for a in batch]
    elapsed = time.monotonic() - began
    assert answers == [ANSWER] * 40
    text = await metrics(gw)
    loads = sum(value(text, "casedesk_model_loads_total", model=m, result="ok") for m in "ab")
    assert loads == len(box.pids())
    assert loads <= 6
    # The bound, with the load time measured here (startup of the fake included).
    longest_load = max(_max_bucket(text, "casedesk_model_load_seconds", m) for m in "ab")
    bound = 3 * longest_load + 2 * (request + 0.35) + 1.0  # + 0.35 s per request, + 1 s stop: a busy box
    with capsys.disabled():
        print(
            f"\nthrash: 40 requests in {elapsed:.2f} s, {loads:g} loads, longest wait+answer {max(latencies):.2f} s, "
            f"bound {bound:.2f} s (longest load <= {longest_load:g} s)"
        )
    assert max(latencies) <= bound
    await stopped(gw)


def _max_bucket(text: str, name: str, model: str) -> float:
    """The upper bound of the largest observation in a histogram."""
    count = value(text, name + "_count", model=model)
    for line in text.splitlines():
        if line.startswith(name + "_bucket") and f'model="{model}"' in line and float(line.rsplit(" ", 1)[1]) == count:
            return float(re.search(r'le="([^"]+)"', line).group(1))  # type: ignore[union-attr]
    raise AssertionError("no bucket")


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("binary missing", "does not exist or is not executable"),
        ("bad model path", "model file"),
        ("not a model", "exited with code 1 while starting"),
        ("crash while loading", "exited with code 1 while starting"),
        ("health timeout", "not healthy after 1 s"),
    ],
)
async def test_a_failed_load_fails_the_waiting_requests_at_once(
    box: Box, start_gateway: GatewayFactory, caplog: pytest.LogCaptureFixture, case: str, reason: str
) -> None:
    spec = box.spec(preload=False, startup_timeout=20)
    server = spec["llama_server"]
    if case == "binary missing":
        server["binary"] = str(box.binary.parent / "no-such-llama-server")
    elif case == "bad model path":
        server["model"] = str(box.model.parent / "missing.gguf")
    elif case == "not a model":
        server["model"] = str(box.model.parent / "notes.txt")
        Path(server["model"]).write_bytes(b"not a gguf")
    elif case == "crash while loading":
        server["args"] += ["--fake-load-seconds", "30", "--fake-exit-after", "0.3"]
    else:
        server["args"] += ["--fake-load-seconds", "30"]
        server["startup_timeout"] = 1
    gw = await start_gateway(parse(box.config({"a": spec, "ok": box.spec(preload=False)})))
    caplog.set_level(logging.ERROR, "casedesk.supervisor")
    began = time.monotonic()
    results = await asyncio.gather(*(ask(gw, "a") for _ in range(3)), return_exceptions=True)
    assert time.monotonic() - began < 10  # at once: not after queue_timeout (30 s)
    for result in results:
        assert isinstance(result, anthropic.InternalServerError), result
        assert result.status_code == 503
        assert "model 'a' could not be started" in result.message and reason in result.message
    assert len(box.pids()) <= 1  # one load for the three, not three
    assert box.running() == []  # and it left nothing behind
    if case in ("not a model", "crash while loading"):
        assert "invalid magic" in caplog.text or "GGML_ASSERT(fake) failed" in caplog.text  # stderr's tail
    status, body = await get(gw, "/readyz")
    assert status == 503 and b"model 'a'" in body and b"cannot start" in body
    assert value(await metrics(gw), "casedesk_model_loads_total", model="a", result="failed") == 1
    # Asked again at once: the same answer, without another load (it retries after a backoff).
    with pytest.raises(anthropic.InternalServerError):
        await ask(gw, "a")
    assert value(await metrics(gw), "casedesk_model_loads_total", model="a", result="failed") == 1
    assert await ask(gw, "ok") == ANSWER  # the other model is unaffected
    await stopped(gw)


async def test_a_load_that_outlasts_queue_timeout_is_a_529_with_retry_after(
    box: Box, start_gateway: GatewayFactory
) -> None:
    spec = box.spec("--fake-load-seconds", "3", preload=False)
    gw = await start_gateway(parse(box.config({"a": spec}, queue_timeout=0.5)))
    with pytest.raises(anthropic.APIStatusError) as caught:
        await ask(gw, "a")
    assert caught.value.status_code == 529
    assert caught.value.response.headers["retry-after"] == "5"
    assert "model 'a' is not loaded" in caught.value.message
    await wait_state(gw, "a", "ready")  # the load itself went on
    assert await ask(gw, "a") == ANSWER
    await stopped(gw)


async def test_a_reload_refused_for_a_server_that_never_gets_healthy_leaves_nothing_running(
    box: Box, start_gateway: GatewayFactory, tmp_path: Path
) -> None:
    config = tmp_path / "casedesk.toml"
    config.write_text(to_toml(box.config({"a": box.spec()})))
    from casedesk.config import load

    gw = await start_gateway(load(config))
    assert await ask(gw, "a") == ANSWER
    first = box.pids()
    broken = box.spec("--fake-load-seconds", "60", startup_timeout=1)
    config.write_text(to_toml(box.config({"a": box.spec(), "b": broken})))
    gw.reload.set()
    await until(lambda: len(box.pids()) == 2, what="the reload to start b")
    await until(lambda: box.running() == first, what="b to be stopped after its failed start")
    assert [m.id async for m in client(gw).models.list()] == ["a"]  # the old config stays
    await stopped(gw)
    assert box.running() == []


async def test_a_preloaded_server_that_dies_is_restarted_and_a_stuck_restart_is_stopped(
    box: Box, start_gateway: GatewayFactory
) -> None:
    # startup_timeout: long enough for a healthy restart on a loaded 2-core machine.
    gw = await start_gateway(parse(box.config({"a": box.spec(startup_timeout=6)})))
    assert await ask(gw, "a") == ANSWER
    (first,) = box.pids()
    os.kill(first, 9)
    await until(lambda: len(box.pids()) == 2, what="a restart")
    await wait_state(gw, "a", "ready")
    assert await ask(gw, "a") == ANSWER
    assert value(await metrics(gw), "casedesk_model_restarts_total", model="a") == 1

    # It dies again, and its restart hangs: given up after startup_timeout, and stopped.
    box.model.write_bytes(b"GGUF never-healthy")
    os.kill(box.pids()[1], 9)
    await until(lambda: len(box.pids()) == 3, what="the second restart")
    stuck = box.pids()[2]
    await until(lambda: not alive(stuck), timeout=20, what="the stuck restart to be stopped")

    async def reported() -> bool:
        # The child is reaped before the failure is recorded: a moment may pass in between.
        status, body = await get(gw, "/readyz")
        return status == 503 and b"not healthy after 6 s" in body

    await until(reported, timeout=5, what="/readyz to report the stuck restart")
    await stopped(gw)


async def test_a_slow_preload_extends_systemds_start_timeout_before_ready(
    box: Box, start_gateway: GatewayFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    listener = NotifyListener(str(tmp_path / "notify"))
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
    gw = await start_gateway(parse(box.config({"a": box.spec("--fake-load-seconds", "0.5")})))
    first, second = listener.next(), listener.next()
    assert "EXTEND_TIMEOUT_USEC=30000000" in first  # while loading: before READY=1
    assert any(line.startswith("STATUS=loading") for line in first)
    while "READY=1" not in second:
        second = listener.next()
    assert await ask(gw, "a") == ANSWER  # READY=1 came once the preloaded model was serving
    await stopped(gw)


async def test_llama_servers_die_with_casedesk_even_when_it_is_killed(box: Box, tmp_path: Path) -> None:
    config = tmp_path / "casedesk.toml"
    raw = box.config({"a": box.spec(), "b": box.spec()})
    raw["server"]["listen"] = "127.0.0.1:0"
    config.write_text(to_toml(raw))
    serve = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "casedesk",
        "serve",
        "--config",
        str(config),
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        await until(lambda: len(box.running()) == 2, timeout=30, what="both preloaded servers")
    finally:
        serve.kill()  # SIGKILL: CaseDesk cannot stop them itself
        await serve.wait()
    await until(lambda: box.running() == [], timeout=10, what="the servers to die with CaseDesk (PR_SET_PDEATHSIG)")


async def test_a_draining_model_serves_newcomers_only_while_its_older_requests_run(box: Box) -> None:
    """The Supervisor's leases, driven directly: the swap policy step by step."""
    config = parse(box.config({"a": box.spec(preload=False), "b": box.spec(preload=False)}, max_loaded=1))
    supervisor = Supervisor(config)
    a, b = supervisor.processes[("dep", "a")], supervisor.processes[("dep", "b")]
    try:
        old = await supervisor.acquire(a, 30)  # loads a
        assert a.state is State.READY and supervisor.stats[a].loads["ok"] == 1
        for_b = asyncio.create_task(supervisor.acquire(b, 30))
        await until(lambda: supervisor.scheduler.draining(a), what="a to drain once b waited the hold (1 s)")
        newcomer = await asyncio.wait_for(supervisor.acquire(a, 30), 5)  # a's old request still runs: served
        supervisor.release(a, old)
        late = asyncio.create_task(supervisor.acquire(a, 30))  # the old ones ended: this one waits
        await until(lambda: supervisor.waiting(a) == 1, what="the late request to queue")
        assert a.state is State.READY and not for_b.done()  # the newcomer is still in flight
        supervisor.release(a, newcomer)
        lease_b = await asyncio.wait_for(for_b, 15)
        assert (a.state, b.state) == (State.STOPPED, State.READY) and supervisor.stats[a].evictions["lru"] == 1
        assert not late.done()
        supervisor.release(b, lease_b)
        lease_a = await asyncio.wait_for(late, 15)  # rides a's next load
        assert (a.state, b.state) == (State.READY, State.STOPPED) and supervisor.stats[a].loads["ok"] == 2
        supervisor.release(a, lease_a)
    finally:
        await supervisor.stop()
    assert (a.state, b.state) == (State.SHUTDOWN, State.SHUTDOWN)


def test_lifecycle_keys_are_checked_with_their_names(box: Box) -> None:
    from casedesk.config import ConfigError

    models = {
        "a": box.spec(preload="yes"),
        "b": box.spec(ttl=-1),
        "c": box.spec(),
        "d": box.spec(),
    }
    with pytest.raises(ConfigError) as caught:
        parse(box.config(models, max_loaded=1))
    problems = "\n".join(caught.value.problems)
    assert "deployments.dep.models.a.llama_server.preload: must be true or false" in problems
    assert "deployments.dep.models.b.llama_server.ttl: must be >= 0" in problems
    assert "server.max_loaded_models: 1 is fewer than the 4 models with preload = true" in problems
    good = parse(box.config({"a": box.spec(preload=False, ttl=30), "b": box.spec()}, max_loaded=1))
    spec = good.deployments["dep"].models["a"].llama_server
    assert spec is not None and (spec.preload, spec.ttl, good.server.max_loaded_models) == (False, 30, 1)


LONG = [{"role": "user", "content": "Summarise this: " + "words of a long document " * 60}]  # > 1 block


async def test_a_models_prompt_cache_is_saved_when_it_is_evicted_and_restored_on_its_next_turn(
    box: Box, start_gateway: GatewayFactory
) -> None:
    """Issue 20 on fakes: a's slot is saved before b evicts it, and a's next turn restores it
    (the fake counts 100 tokens per pinned prompt); a file of another conversation is not."""
    models = {"a": box.spec(preload=False), "b": box.spec(preload=False)}
    gw = await start_gateway(parse(box.config(models, max_loaded=1)))
    first = await client(gw).messages.create(model="a", max_tokens=5, messages=LONG)
    assert await ask(gw, "b") == ANSWER  # evicts a: its slot is saved first
    text = await metrics(gw)
    assert value(text, "casedesk_slot_files_saved_total") == 1
    assert value(text, "casedesk_slot_cache_bytes") == 52 + 4096 * 100
    assert len(list(box.state.glob("slots/*/*.bin"))) == 1
    assert await ask(gw, "a") == ANSWER  # another conversation: nothing to restore
    assert value(await metrics(gw), "casedesk_slot_files_restored_total") == 0
    assert await ask(gw, "b") == ANSWER
    turn = [*LONG, {"role": "assistant", "content": first.content[0].text}, {"role": "user", "content": "more"}]  # type: ignore[union-attr]
    await client(gw).messages.create(model="a", max_tokens=5, messages=turn)
    text = await metrics(gw)
    assert value(text, "casedesk_slot_files_restored_total") == 1
    assert value(text, "casedesk_slot_restored_tokens_total") == 100
    await stopped(gw)
    index = (box.state / "slots" / "index.json").read_bytes()
    assert b'"model":"dep/a"' in index  # on disk, for the next start


async def test_a_slot_save_that_never_answers_does_not_hold_up_the_swap(
    box: Box, start_gateway: GatewayFactory, caplog: pytest.LogCaptureFixture
) -> None:
    a = box.spec("--fake-slot-save-seconds", "600", preload=False)
    raw = box.config({"a": a, "b": box.spec(preload=False)}, max_loaded=1)
    raw["server"]["slot_save_timeout"] = 0.5
    gw = await start_gateway(parse(raw))
    await client(gw).messages.create(model="a", max_tokens=5, messages=LONG)
    caplog.set_level(logging.WARNING, "casedesk.slots")
    began = time.monotonic()
    assert await ask(gw, "b") == ANSWER
    assert time.monotonic() - began < 8  # the hold (1 s), 0.5 s of saving, a stop, b's load
    assert "slot saves past slot_save_timeout (0.5 s): lost slot(s) [0]" in caplog.text
    assert value(await metrics(gw), "casedesk_slot_files_dropped_total", reason="save_timeout") == 1
    await stopped(gw)
