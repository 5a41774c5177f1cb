"""Prompt caches that outlive their llama-server (issue 20): which saved slot file holds which
conversation prefix, bounded, on disk with the files.

llama-server saves a slot's KV cache to a file in its `--slot-save-path` and restores it into a
slot (`POST /slots/{id}?action=save|restore`, docs/llama-server-facts.md "Slot files"). What a
file holds is CaseDesk's to remember: the affinity block hashes (upstream/affinity.py) of the
prompt the slot last served, so that a later turn of the same conversation, whose prompt begins
with those blocks, finds it. A file belongs to one model run's *fingerprint* (the launch command
without its port, and the size and mtime of the binary and the model file): a file saved for
another model, other context args or another llama-server build is never restored, and is
dropped when its model next starts.

`SlotIndex` decides (no I/O): the best file for a prompt, the bound (`slot_cache_bytes`, least
recently used first), what a new save supersedes. `SlotStore` keeps it on disk (index.json,
written whole and renamed into place) and deletes the files it drops.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import re
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import orjson

from casedesk.upstream.client import call_json
from casedesk.upstream.connection import UpstreamError
from casedesk.upstream.pool import UpstreamPool

log = logging.getLogger("casedesk.slots")

INDEX = "index.json"


@dataclass(frozen=True, slots=True)
class SavedSlot:
    model: str  # "deployment/tag"
    file: str  # its name in the model's directory
    fingerprint: str  # the model run it was saved from
    blocks: tuple[str, ...]  # hex block hashes of the prompt it holds, in order
    tokens: int  # tokens in the slot when saved (llama-server's n_saved)
    size: int  # bytes on disk (n_written)
    used: float  # wall-clock time of its last save or restore: least recently used goes first


def matched(blocks: tuple[str, ...], prompt: tuple[str, ...]) -> int:
    """How many leading blocks of `prompt` a file holding `blocks` covers (the hashes are
    chained: one equal hash means the whole prefix up to it is equal)."""
    count = min(len(blocks), len(prompt))
    while count and blocks[count - 1] != prompt[count - 1]:
        count -= 1
    return count


class SlotIndex:
    """Saved slot files, by model; bounded in bytes."""

    def __init__(self, limit_bytes: int) -> None:
        self.limit_bytes = limit_bytes
        self.entries: dict[tuple[str, str], SavedSlot] = {}

    def total_bytes(self) -> int:
        return sum(entry.size for entry in self.entries.values())

    def best(self, model: str, fingerprint: str, prompt: tuple[str, ...]) -> tuple[SavedSlot | None, int]:
        """The file of this model run that covers most of `prompt`, and how many blocks."""
        found, most = None, 0
        for entry in self.entries.values():
            if entry.model == model and entry.fingerprint == fingerprint:
                count = matched(entry.blocks, prompt)
                if count > most or (count == most and found is not None and entry.used > found.used):
                    found, most = entry, count
        return (found, most) if most else (None, 0)

    def add(self, entry: SavedSlot) -> list[tuple[SavedSlot, str]]:
        """Record a save; what it drops, with why: files it supersedes (the same conversation,
        a shorter prefix of it) and, past the bound, the least recently used."""
        dropped: list[tuple[SavedSlot, str]] = []
        for key, old in list(self.entries.items()):
            if old.model == entry.model and matched(old.blocks, entry.blocks) == len(old.blocks):
                del self.entries[key]
                if old.file != entry.file:
                    dropped.append((old, "superseded"))
        self.entries[(entry.model, entry.file)] = entry
        return dropped + self.enforce_bound()

    def enforce_bound(self) -> list[tuple[SavedSlot, str]]:
        """Least recently used first, until the files fit `limit_bytes`."""
        dropped: list[tuple[SavedSlot, str]] = []
        while self.total_bytes() > self.limit_bytes and self.entries:
            oldest = min(self.entries.values(), key=lambda e: e.used)
            del self.entries[(oldest.model, oldest.file)]
            dropped.append((oldest, "bound"))
        return dropped

    def touch(self, entry: SavedSlot, now: float) -> None:
        key = (entry.model, entry.file)
        if key in self.entries:
            current = self.entries[key]
            self.entries[key] = SavedSlot(**{**asdict(current), "used": now})

    def drop_changed(self, model: str, fingerprint: str) -> list[SavedSlot]:
        """The files of `model` saved from another run than `fingerprint`'s."""
        gone = [e for e in self.entries.values() if e.model == model and e.fingerprint != fingerprint]
        for entry in gone:
            del self.entries[(entry.model, entry.file)]
        return gone

    def to_json(self) -> bytes:
        return orjson.dumps([asdict(entry) for entry in self.entries.values()])

    @classmethod
    def from_json(cls, data: bytes, limit_bytes: int) -> SlotIndex:
        index = cls(limit_bytes)
        for raw in orjson.loads(data):
            entry = SavedSlot(**{**raw, "blocks": tuple(raw["blocks"])})
            index.entries[(entry.model, entry.file)] = entry
        return index


class SlotStore:
    """The index on disk, the files beside it (one directory per model), and the counters
    /metrics shows."""

    def __init__(self, root: Path, limit_bytes: int) -> None:
        self.root = root
        self.counts = {"saved": 0, "restored": 0, "tokens_restored": 0}
        self.dropped: Counter[str] = Counter()
        index_file = root / INDEX
        try:
            self.index = SlotIndex.from_json(index_file.read_bytes(), limit_bytes)
        except FileNotFoundError:
            self.index = SlotIndex(limit_bytes)
        except (ValueError, TypeError, KeyError) as exc:
            log.warning("slot cache index %s unreadable (%s): starting empty", index_file, exc)
            self.index = SlotIndex(limit_bytes)
        for entry in list(self.index.entries.values()):
            if not (self.directory(entry.model) / entry.file).is_file():
                del self.index.entries[(entry.model, entry.file)]
                self.dropped["missing"] += 1
        self.drop(self.index.enforce_bound())  # the bound may have shrunk since

    def directory(self, model: str) -> Path:
        """The model's --slot-save-path: readable, and distinct for distinct names."""
        safe = re.sub(r"[^A-Za-z0-9._-]", "_", model)
        return self.root / f"{safe}-{hashlib.blake2b(model.encode(), digest_size=4).hexdigest()}"

    def drop(self, entries: list[tuple[SavedSlot, str]]) -> None:
        for entry, reason in entries:
            self.dropped[reason] += 1
            try:
                os.unlink(self.directory(entry.model) / entry.file)
            except FileNotFoundError:
                pass

    def commit(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        temporary = self.root / (INDEX + ".tmp")
        temporary.write_bytes(self.index.to_json())
        os.replace(temporary, self.root / INDEX)


def fingerprint(command: list[str]) -> str:
    """A model run's identity: its command without the address, and the binary and model files'
    sizes and mtimes (a rebuilt llama-server or a replaced model makes another)."""
    kept: list[str] = []
    skip = False
    for arg in command:
        if skip:
            skip = False
            continue
        if arg in ("--host", "--port"):
            skip = True
            continue
        kept.append(arg)
    files = [command[0]]
    if "-m" in command:
        files.append(command[command.index("-m") + 1])
    stats = []
    for name in files:
        try:
            info = os.stat(name)
            stats.append([name, info.st_size, info.st_mtime_ns])
        except OSError:
            stats.append([name, 0, 0])
    return hashlib.sha256(orjson.dumps([kept, stats])).hexdigest()[:32]


@dataclass(slots=True)
class _Slot:
    busy: int = 0  # requests pinned to it now
    blocks: tuple[str, ...] = ()  # the prompt it last served (or was restored with)
    dirty: bool = False  # served since its last save or restore: worth saving
    used: float = 0.0


class RunSlots:
    """The slots of one llama-server run: every request is pinned to one (`id_slot`), so CaseDesk
    knows what each holds; before the run stops, each slot that served a prompt is saved."""

    def __init__(self, store: SlotStore, model: str, fingerprint: str, pool: UpstreamPool, count: int) -> None:
        self.store = store
        self.model = model
        self.fingerprint = fingerprint
        self.pool = pool
        self.slots = [_Slot() for _ in range(count)]

    async def pin(self, prompt: tuple[str, ...]) -> int:
        """The slot for a prompt: the free one holding most of it, else (restoring the saved
        file that holds more of it, if any) an empty or the least recently used free one, else
        the busy one holding most (llama-server defers the request until that slot is free)."""
        free = [i for i, slot in enumerate(self.slots) if not slot.busy]
        pool = free or list(range(len(self.slots)))
        best = max(pool, key=lambda i: (matched(self.slots[i].blocks, prompt), -self.slots[i].busy))
        have = matched(self.slots[best].blocks, prompt)
        saved, covered = self.store.index.best(self.model, self.fingerprint, prompt)
        if saved is None or covered <= have or not free:
            self.slots[best].busy += 1
            return best
        target = min(free, key=lambda i: (bool(self.slots[i].blocks), self.slots[i].used))
        slot = self.slots[target]
        slot.busy += 1
        began = time.monotonic()
        try:
            status, body = await call_json(
                self.pool, "POST", f"/slots/{target}?action=restore", {"filename": saved.file}, 30.0
            )
        except UpstreamError as exc:
            status, body = 0, str(exc)
        if status == 200 and isinstance(body, dict):
            slot.blocks, slot.dirty = saved.blocks, False
            self.store.counts["restored"] += 1
            self.store.counts["tokens_restored"] += int(body.get("n_restored", 0))
            self.store.index.touch(saved, time.time())
            log.info(
                "%s: restored %s (%s tokens) into slot %d in %.0f ms",
                self.model,
                saved.file,
                body.get("n_restored"),
                target,
                (time.monotonic() - began) * 1000,
            )
        else:
            log.warning("%s: restoring %s failed (%s %s): dropped", self.model, saved.file, status, body)
            self.store.index.entries.pop((saved.model, saved.file), None)
            self.store.drop([(saved, "restore_failed")])
            self.store.commit()
        return target

    def release(self, slot: int, prompt: tuple[str, ...], now: float) -> None:
        state = self.slots[slot]
        state.busy -= 1
        state.blocks, state.dirty, state.used = prompt, True, now

    async def save_all(self, timeout: float) -> None:
        """Save each slot that served a prompt since its last save, within `timeout` in all;
        past it the log says which saves were lost (the caller stops the run anyway)."""
        pending = [i for i, slot in enumerate(self.slots) if slot.dirty and slot.blocks]
        done: list[int] = []
        try:
            async with asyncio.timeout(timeout):
                for index in pending:
                    await self._save(index)
                    done.append(index)
        except TimeoutError:
            lost = [i for i in pending if i not in done]
            log.warning("%s: slot saves past slot_save_timeout (%g s): lost slot(s) %s", self.model, timeout, lost)
            self.store.dropped["save_timeout"] += len(lost)
        finally:
            self.store.commit()

    async def _save(self, index: int) -> None:
        slot = self.slots[index]
        name = f"{uuid.uuid4().hex}.bin"
        began = time.monotonic()
        try:
            status, body = await call_json(self.pool, "POST", f"/slots/{index}?action=save", {"filename": name}, 60.0)
        except UpstreamError as exc:
            log.warning("%s: saving slot %d failed: %s", self.model, index, exc)
            return
        if status != 200 or not isinstance(body, dict) or not body.get("n_saved"):
            log.warning("%s: saving slot %d failed: %s %s", self.model, index, status, body)
            return
        entry = SavedSlot(
            self.model, name, self.fingerprint, slot.blocks, int(body["n_saved"]), int(body["n_written"]), time.time()
        )
        self.store.drop(self.store.index.add(entry))
        self.store.counts["saved"] += 1
        slot.dirty = False
        log.info(
            "%s: saved slot %d (%d tokens, %d bytes) in %.0f ms",
            self.model,
            index,
            entry.tokens,
            entry.size,
            (time.monotonic() - began) * 1000,
        )


async def open_run(store: SlotStore, model: str, command: list[str], pool: UpstreamPool) -> RunSlots | None:
    """After a load: the run's slots (GET /slots), its stale files dropped; None when the
    server lists no slots."""
    try:
        status, body = await call_json(pool, "GET", "/slots", None, 10.0)
    except UpstreamError as exc:
        log.warning("%s: GET /slots failed (%s): no slot cache for this run", model, exc)
        return None
    if status != 200 or not isinstance(body, list) or not body:
        log.warning("%s: GET /slots answered %s: no slot cache for this run", model, status)
        return None
    run = RunSlots(store, model, fingerprint(command), pool, len(body))
    changed = store.index.drop_changed(model, run.fingerprint)
    if changed:
        log.info("%s: %d slot file(s) from another model, args or build dropped", model, len(changed))
        store.drop([(entry, "changed") for entry in changed])
        store.commit()
    return run
