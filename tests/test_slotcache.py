"""The slot-file index (casedesk/ops/slotcache.py): which saved file serves which prompt, the
bound, invalidation, and the index on disk across a restart."""

from __future__ import annotations

from pathlib import Path

from casedesk.ops.slotcache import SavedSlot, SlotIndex, SlotStore, fingerprint, matched


def saved(file: str, blocks: str, size: int = 10, used: float = 0.0, model: str = "d/a", fp: str = "f1") -> SavedSlot:
    return SavedSlot(model, file, fp, tuple(blocks), tokens=len(blocks) * 128, size=size, used=used)


def test_a_file_serves_the_prompts_that_begin_with_what_it_holds() -> None:
    index = SlotIndex(1000)
    index.add(saved("x.bin", "abc"))
    index.add(saved("y.bin", "pq"))
    assert matched(tuple("abc"), tuple("abcde")) == 3
    assert index.best("d/a", "f1", tuple("abcde")) == (index.entries[("d/a", "x.bin")], 3)
    assert index.best("d/a", "f1", tuple("abz")) == (index.entries[("d/a", "x.bin")], 2)  # a shared head
    assert index.best("d/a", "f1", tuple("zzz")) == (None, 0)
    assert index.best("d/b", "f1", tuple("abc")) == (None, 0)  # another model's file: never
    assert index.best("d/a", "f2", tuple("abc")) == (None, 0)  # another run's (args, build): never


def test_a_later_save_of_the_same_conversation_supersedes_the_earlier() -> None:
    index = SlotIndex(1000)
    index.add(saved("turn1.bin", "ab"))
    dropped = index.add(saved("turn3.bin", "abcd"))
    assert [(e.file, why) for e, why in dropped] == [("turn1.bin", "superseded")]
    assert list(index.entries) == [("d/a", "turn3.bin")]


def test_the_store_is_bounded_least_recently_used_first() -> None:
    index = SlotIndex(25)
    index.add(saved("old.bin", "a", size=10, used=1.0))
    index.add(saved("mid.bin", "b", size=10, used=2.0))
    index.touch(index.entries[("d/a", "old.bin")], 5.0)  # restored lately: kept
    dropped = index.add(saved("new.bin", "c", size=10, used=3.0))
    assert [(e.file, why) for e, why in dropped] == [("mid.bin", "bound")]
    assert index.total_bytes() == 20 <= index.limit_bytes


def test_files_of_another_model_run_are_dropped_when_the_model_starts() -> None:
    index = SlotIndex(1000)
    index.add(saved("x.bin", "ab", fp="old"))
    index.add(saved("y.bin", "cd", fp="new"))
    index.add(saved("z.bin", "ef", fp="old", model="d/b"))
    assert [e.file for e in index.drop_changed("d/a", "new")] == ["x.bin"]
    assert sorted(f for _, f in index.entries) == ["y.bin", "z.bin"]


def test_a_fingerprint_changes_with_args_model_and_binary_but_not_the_port(tmp_path: Path) -> None:
    binary, model = tmp_path / "llama-server", tmp_path / "m.gguf"
    binary.write_text("v1")
    model.write_text("GGUF")
    base = fingerprint([str(binary), "-m", str(model), "--host", "127.0.0.1", "--port", "1", "-c", "8192"])
    assert base == fingerprint([str(binary), "-m", str(model), "--host", "127.0.0.1", "--port", "2", "-c", "8192"])
    assert base != fingerprint([str(binary), "-m", str(model), "--host", "127.0.0.1", "--port", "1", "-c", "4096"])
    binary.write_text("v2, rebuilt")
    assert base != fingerprint([str(binary), "-m", str(model), "--host", "127.0.0.1", "--port", "1", "-c", "8192"])


def test_the_index_survives_a_restart_and_forgets_files_that_are_gone(tmp_path: Path) -> None:
    store = SlotStore(tmp_path, 1000)
    for name in ("kept.bin", "gone.bin"):
        entry = saved(name, name[0])
        store.directory(entry.model).mkdir(parents=True, exist_ok=True)
        (store.directory(entry.model) / name).write_bytes(b"x" * 10)
        store.drop(store.index.add(entry))
    store.commit()
    (store.directory("d/a") / "gone.bin").unlink()
    again = SlotStore(tmp_path, 1000)
    assert list(again.index.entries) == [("d/a", "kept.bin")]
    assert again.dropped["missing"] == 1
    smaller = SlotStore(tmp_path, 5)  # the bound shrank: enforced at start, files deleted
    assert smaller.index.entries == {} and not (smaller.directory("d/a") / "kept.bin").exists()
