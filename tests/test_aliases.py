"""Model aliases (`[deployments.D.aliases]`): a client that asks for a name the deployment does
not serve (Claude Code asks for `claude-…`) reaches the tag its first matching pattern names.

Three fake llama-servers, one per tag, each answering a different word, show which tag served
a request; the official Python SDK is the client.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anthropic
import orjson
import pytest

from casedesk.cli import main as cli_main
from casedesk.config import ConfigError, parse
from tests.conftest import GatewayFactory, RunningGateway
from tests.fake_llama import FakeLlamaServer, Reply
from tests.support.wire import get

ASK = [{"role": "user", "content": "hi"}]
# File order matters: "claude-*haiku*" is listed before the catch-all "claude-*".
ALIASES = {"claude-*haiku*": "qwen", "claude-*": "gemma"}


@dataclass
class Fleet:
    gateway: RunningGateway
    fakes: dict[str, FakeLlamaServer]  # tag → its upstream
    access_log: Path

    def client(self) -> anthropic.AsyncAnthropic:
        return anthropic.AsyncAnthropic(base_url=self.gateway.base_url(), api_key="k", max_retries=0)

    def served_by(self) -> list[str]:
        """Which tag's upstream got each chat request, in order."""
        return [tag for tag, fake in self.fakes.items() for _ in fake.chat_requests()]


def config(urls: dict[str, str], aliases: dict[str, str], access_log: str = "") -> dict[str, Any]:
    models = {tag: {"upstreams": [url]} for tag, url in urls.items()}
    return {
        "server": {"listen": "127.0.0.1:0", "health_interval": 3600, "access_log": access_log, "allowed_hosts": ["x"]},
        "deployments": {"dep": {"models": models, "aliases": aliases}},
    }


@pytest.fixture
async def fleet(start_gateway: GatewayFactory, tmp_path: Path) -> AsyncIterator[Fleet]:
    # "claude-opus" is a real tag here: asked for by name it must beat the "claude-*" pattern.
    tags = ("gemma", "qwen", "claude-opus")
    fakes = {tag: FakeLlamaServer(Reply(tokens=[f"from-{tag}"])) for tag in tags}
    for fake in fakes.values():
        await fake.start()
    log = tmp_path / "access.log"
    gateway = await start_gateway(config({t: f.url for t, f in fakes.items()}, ALIASES, str(log)))
    yield Fleet(gateway, fakes, log)
    for fake in fakes.values():
        await fake.close()


async def ask(fleet: Fleet, model: str) -> anthropic.types.Message:
    return await fleet.client().messages.create(model=model, max_tokens=10, messages=ASK)


async def test_a_pattern_routes_to_its_tag_and_the_answer_names_the_requested_model(fleet: Fleet) -> None:
    message = await ask(fleet, "claude-sonnet-4-5")
    assert message.content[0].text == "from-gemma"  # type: ignore[union-attr]
    assert message.model == "claude-sonnet-4-5"  # as Anthropic's API answers: the name asked for
    # llama-server is asked for the tag, not the client's name.
    assert (fleet.fakes["gemma"].chat_requests()[-1].body or {})["model"] == "gemma"


async def test_streamed_message_start_names_the_requested_model(fleet: Fleet) -> None:
    async with fleet.client().messages.stream(model="claude-opus-5-5", max_tokens=10, messages=ASK) as stream:
        events = [event async for event in stream]
    start = next(e for e in events if e.type == "message_start")
    assert start.message.model == "claude-opus-5-5"  # type: ignore[union-attr]
    assert "".join(e.delta.text for e in events if e.type == "content_block_delta") == "from-gemma"  # type: ignore[union-attr]


async def test_the_first_matching_pattern_in_file_order_wins(fleet: Fleet) -> None:
    haiku = await ask(fleet, "claude-haiku-4-5")  # matches both patterns: the first one listed wins
    other = await ask(fleet, "claude-sonnet-4")
    assert (haiku.content[0].text, other.content[0].text) == ("from-qwen", "from-gemma")  # type: ignore[union-attr]
    assert fleet.served_by() == ["gemma", "qwen"]


async def test_the_same_patterns_in_the_other_order_resolve_the_other_way(start_gateway: GatewayFactory) -> None:
    gemma_fake, qwen_fake = FakeLlamaServer(Reply(tokens=["from-gemma"])), FakeLlamaServer(Reply(tokens=["from-qwen"]))
    async with gemma_fake as gemma, qwen_fake as qwen:
        reversed_aliases = dict(reversed(list(ALIASES.items())))  # "claude-*" first
        gateway = await start_gateway(config({"gemma": gemma.url, "qwen": qwen.url}, reversed_aliases))
        client = anthropic.AsyncAnthropic(base_url=gateway.base_url(), api_key="k", max_retries=0)
        message = await client.messages.create(model="claude-haiku-4-5", max_tokens=10, messages=ASK)
        assert message.content[0].text == "from-gemma"  # type: ignore[union-attr]


async def test_an_exact_tag_beats_a_matching_pattern(fleet: Fleet) -> None:
    message = await ask(fleet, "claude-opus")  # a tag, though "claude-*" also matches it
    assert message.content[0].text == "from-claude-opus"  # type: ignore[union-attr]
    assert message.model == "claude-opus"


async def test_patterns_are_case_sensitive(fleet: Fleet) -> None:
    with pytest.raises(anthropic.NotFoundError):
        await ask(fleet, "Claude-Sonnet")


async def test_an_unknown_model_is_a_404_listing_the_tags_and_the_patterns(fleet: Fleet) -> None:
    with pytest.raises(anthropic.NotFoundError) as caught:
        await ask(fleet, "gpt-5")
    error = caught.value.body["error"]  # type: ignore[index]
    assert error["type"] == "not_found_error"
    message = error["message"]
    for name in ("'gpt-5'", "gemma", "qwen", "claude-opus", '"claude-*haiku*" -> qwen', '"claude-*" -> gemma'):
        assert name in message, message
    assert fleet.served_by() == []


async def test_count_tokens_resolves_the_same_way(fleet: Fleet) -> None:
    counted = await fleet.client().messages.count_tokens(model="claude-3-5-haiku", messages=ASK)
    asked = [r for r in fleet.fakes["qwen"].requests if r.path == "/apply-template"]
    assert len(asked) == 1 and (asked[0].body or {})["model"] == "qwen"
    assert not [r for r in fleet.fakes["gemma"].requests if r.path == "/apply-template"]
    direct = await fleet.client().messages.count_tokens(model="qwen", messages=ASK)
    assert counted.input_tokens == direct.input_tokens > 0


async def test_models_retrieve_of_an_alias_answers_with_its_tag(fleet: Fleet) -> None:
    assert (await fleet.client().models.retrieve("claude-haiku-4-5")).id == "qwen"
    assert [m.id async for m in fleet.client().models.list()] == ["gemma", "qwen", "claude-opus"]


async def test_access_log_records_the_requested_name_and_the_resolved_tag(fleet: Fleet) -> None:
    await ask(fleet, "claude-sonnet-4")
    await fleet.client().messages.count_tokens(model="claude-haiku-4-5", messages=ASK)
    with pytest.raises(anthropic.NotFoundError):
        await ask(fleet, "gpt-5")
    lines = [orjson.loads(line) for line in fleet.access_log.read_bytes().splitlines()]
    assert [(r["model"], r["tag"], r["status"]) for r in lines] == [
        ("claude-sonnet-4", "gemma", 200),
        ("claude-haiku-4-5", "qwen", 200),
        ("gpt-5", "", 404),
    ]


async def test_metrics_are_labelled_by_the_resolved_tag(fleet: Fleet) -> None:
    await ask(fleet, "claude-sonnet-4")
    await ask(fleet, "claude-opus-5-5")
    with pytest.raises(anthropic.NotFoundError):
        await ask(fleet, "gpt-5")
    status, body = await get(fleet.gateway, "/metrics")
    text = body.decode()
    assert status == 200
    assert 'casedesk_requests_total{deployment="dep",model="gemma",status="200"} 2' in text
    assert 'casedesk_requests_total{deployment="dep",model="",status="404"} 1' in text
    assert "claude-sonnet" not in text and "claude-opus-5-5" not in text and "gpt-5" not in text


def test_resolution_rules_on_the_config_alone() -> None:
    dep = parse(config({"gemma": "http://127.0.0.1:1", "qwen": "http://127.0.0.1:2"}, ALIASES)).deployments["dep"]
    assert dep.aliases == (("claude-*haiku*", "qwen"), ("claude-*", "gemma"))
    assert [dep.resolve(n) for n in ("qwen", "claude-haiku", "claude-x", "claude", "[x]")] == [
        "qwen",
        "qwen",
        "gemma",
        None,
        None,
    ]


def test_an_alias_to_a_tag_the_deployment_lacks_is_named_by_its_key() -> None:
    with pytest.raises(ConfigError) as caught:
        parse(config({"gemma": "http://127.0.0.1:1"}, {"claude-*": "gemma3:270m", "ok-*": "gemma", "n": 5}))
    assert caught.value.problems == [
        'deployments.dep.aliases."claude-*": must name a model tag of this deployment (its tags: gemma), '
        "got 'gemma3:270m'",
        "deployments.dep.aliases.n: must name a model tag of this deployment (its tags: gemma), got 5",
    ]


def test_check_config_rejects_a_bad_alias(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "casedesk.toml"
    path.write_text(
        '[deployments.local.models."gemma3:270m"]\nupstreams = ["http://127.0.0.1:8080"]\n'
        '[deployments.local.aliases]\n"claude-*" = "gemma3:1b"\n'
    )
    assert cli_main(["check-config", str(path)]) == 1
    err = capsys.readouterr().err
    assert 'deployments.local.aliases."claude-*": must name a model tag of this deployment' in err
    assert "gemma3:270m" in err and "'gemma3:1b'" in err
