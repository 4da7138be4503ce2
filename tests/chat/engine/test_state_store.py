"""chat/engine/state_store.py: saved states on disk, bounded, found again after a restart, never trusted blindly."""

from __future__ import annotations

import os
import time

import pytest

from chat.engine.state_store import StateStore, model_fingerprint, state_fingerprint

FINGERPRINT = "0123456789abcdef0123456789abcdef"
OTHER_MODEL = "fedcba9876543210fedcba9876543210"


def store_in(tmp_path, budget=1 << 20, fingerprint=FINGERPRINT) -> StateStore:
    return StateStore(tmp_path, fingerprint=fingerprint, budget_bytes=budget)


def test_a_state_written_is_found_by_a_longer_prompt_and_after_a_restart(tmp_path):
    store = store_in(tmp_path)
    assert store.put([1, 2, 3, 4], b"state of four tokens")
    store.flush()
    found, length = store.longest_match([1, 2, 3, 4, 5, 6])
    assert (found.tokens, found.state, length) == ((1, 2, 3, 4), b"state of four tokens", 4)
    store.close()

    restarted = store_in(tmp_path)
    found, length = restarted.longest_match([1, 2, 3, 9])
    assert found.state == b"state of four tokens" and length == 3
    assert restarted.longest_match([7, 8]) == (None, 0)


def test_a_state_on_disk_is_its_owners_beyond_the_sites_content_also_after_a_restart(tmp_path):
    store = store_in(tmp_path)
    store.put(range(10), b"user:1's conversation", owner="user:1", shared=4)
    store.put(range(10), b"user:2's", owner="user:2", shared=4)  # the same tokens: a file of its own
    store.put(range(6), b"user:2's shorter", owner="user:2", shared=4)  # not user:1's to drop
    store.close()
    restarted = store_in(tmp_path)
    found, length = restarted.longest_match(range(12), owner="user:1", shared=8)
    assert (found.state, found.owner, found.shared, length) == (b"user:1's conversation", "user:1", 4, 10)
    assert restarted.longest_match(range(12), owner="user:3", shared=8)[1] == 4
    assert restarted.longest_match(range(12), owner="user:3", shared=8, better_than=4) == (None, 0)
    assert restarted.longest_match(range(12), owner="user:3") == (None, 0)
    assert len(restarted) == 3


def test_a_corrupt_file_is_ignored_and_removed(tmp_path):
    store = store_in(tmp_path)
    store.put([5, 6, 7], b"x" * 100)
    store.flush()
    (path,) = tmp_path.glob("*.kv")
    data = bytearray(path.read_bytes())
    data[-40] ^= 0xFF  # one flipped byte inside the state
    path.write_bytes(bytes(data))
    assert store.longest_match([5, 6, 7, 8]) == (None, 0)
    assert not path.exists()


def test_a_truncated_file_is_removed_at_startup(tmp_path):
    store = store_in(tmp_path)
    store.put(list(range(50)), b"y" * 100)
    store.flush()
    (path,) = tmp_path.glob("*.kv")
    path.write_bytes(path.read_bytes()[:60])
    restarted = store_in(tmp_path)
    assert len(restarted) == 0 and not path.exists()


def test_a_file_of_another_model_is_ignored_and_removed(tmp_path):
    other = store_in(tmp_path, fingerprint=OTHER_MODEL)
    other.put([1, 2, 3], b"another model's state")
    other.flush()
    store = store_in(tmp_path)
    assert store.longest_match([1, 2, 3]) == (None, 0)
    assert list(tmp_path.glob("*.kv")) == []


def test_the_directory_stays_within_its_budget_dropping_the_least_recently_used(tmp_path):
    store = store_in(tmp_path, budget=3000)
    for first in range(5):
        store.put([first, 100, 101], bytes(900))
        store.flush()
        time.sleep(0.02)  # distinct modification times
        if first == 2:
            assert store.longest_match([0, 100, 101])[0] is not None  # touched: recently used
    sizes = sum(path.stat().st_size for path in tmp_path.glob("*.kv"))
    assert sizes <= 3000
    assert store.longest_match([0, 100, 101])[0] is not None  # kept: used after 1 and 2
    assert store.longest_match([1, 100, 101]) == (None, 0)  # the least recently used went first


def test_a_longer_state_replaces_the_prefix_it_extends(tmp_path):
    store = store_in(tmp_path)
    store.put([1, 2], b"short")
    store.flush()
    store.put([1, 2, 3, 4], b"long")
    store.flush()
    assert len(list(tmp_path.glob("*.kv"))) == 1
    assert store.longest_match([1, 2, 3, 4])[0].state == b"long"


def test_put_never_blocks_when_the_writer_is_behind(tmp_path, monkeypatch):
    store = store_in(tmp_path)
    gate = __import__("threading").Event()
    original = store._write
    monkeypatch.setattr(store, "_write", lambda *args: (gate.wait(10), original(*args)))
    results = [store.put([index], b"z") for index in range(50)]
    assert not all(results) and store.dropped_writes > 0  # dropped, not waited for
    gate.set()
    store.flush()


def test_the_fingerprint_changes_with_the_file(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(os.urandom(1000))
    first = model_fingerprint(path)
    assert model_fingerprint(path) == first
    path.write_bytes(os.urandom(1000))
    assert model_fingerprint(path) != first


@pytest.mark.parametrize("budget", [10])
def test_a_state_larger_than_the_budget_is_not_written(tmp_path, budget):
    store = store_in(tmp_path, budget=budget)
    store.put([1], b"much too large")
    store.flush()
    assert list(tmp_path.glob("*.kv")) == []


def test_the_fingerprint_reads_blocks_across_the_file(tmp_path):
    path = tmp_path / "model.gguf"
    data = bytearray(os.urandom(24 << 20))  # past the first and last 4 MiB
    path.write_bytes(bytes(data))
    first = model_fingerprint(path)
    data[len(data) // 2 + 100] ^= 0xFF  # in the middle (a fine-tune with the same header and tail), where a block is read
    path.write_bytes(bytes(data))
    assert model_fingerprint(path) != first


def test_the_state_key_changes_with_each_setting_that_shapes_the_cells():
    settings = {"flash_attention": True, "prompt_chunk": 64, "type_k": 1, "type_v": 1, "llama_cpp": "0.3.36"}
    key = state_fingerprint(FINGERPRINT, settings)
    assert len(key) == 32 and state_fingerprint(FINGERPRINT, dict(settings)) == key
    for name, other in [("flash_attention", False), ("prompt_chunk", 32), ("type_k", 8), ("type_v", 8),
                        ("llama_cpp", "0.3.37")]:
        assert state_fingerprint(FINGERPRINT, {**settings, name: other}) != key, name
    assert state_fingerprint(OTHER_MODEL, settings) != key


def test_no_file_is_read_when_memory_holds_as_much(tmp_path, monkeypatch):
    store = store_in(tmp_path)
    store.put([1, 2, 3, 4], b"four")
    store.flush()
    reads = []
    original = store._read
    monkeypatch.setattr(store, "_read", lambda path: (reads.append(path), original(path))[1])
    assert store.longest_match([1, 2, 3, 4, 5], better_than=4) == (None, 0)
    assert reads == []
    found, length = store.longest_match([1, 2, 3, 4, 5], better_than=3)
    assert (found.state, length, len(reads)) == (b"four", 4, 1)


def test_a_state_the_model_rejected_is_discarded(tmp_path):
    store = store_in(tmp_path)
    store.put([1, 2, 3], b"rejected")
    store.flush()
    store.discard([1, 2, 3])
    assert store.longest_match([1, 2, 3]) == (None, 0)
    assert list(tmp_path.glob("*.kv")) == []


def test_a_stale_half_written_file_is_removed_at_startup(tmp_path):
    stale, fresh = tmp_path / "abc.123.tmp", tmp_path / "def.456.tmp"
    stale.write_bytes(b"cut short")
    fresh.write_bytes(b"another process is writing it")
    os.utime(stale, (time.time() - 3600, time.time() - 3600))
    store_in(tmp_path)
    assert not stale.exists() and fresh.exists()


def test_the_directory_and_its_files_are_private(tmp_path):
    directory = tmp_path / "states"
    store = store_in(directory)
    store.put([1, 2], b"a conversation")
    store.flush()
    (path,) = directory.glob("*.kv")
    assert directory.stat().st_mode & 0o777 == 0o700
    assert path.stat().st_mode & 0o777 == 0o600


def test_put_with_wait_drops_nothing_when_the_writer_is_behind(tmp_path, monkeypatch):
    store = store_in(tmp_path)
    gate = __import__("threading").Event()
    original = store._write
    monkeypatch.setattr(store, "_write", lambda *args: (gate.wait(10), original(*args)))
    releaser = __import__("threading").Timer(0.5, gate.set)
    releaser.start()
    results = [store.put([index, 100], b"z", wait=30) for index in range(20)]  # more than the queue holds
    store.flush()
    assert all(results) and store.dropped_writes == 0
    assert len(list(tmp_path.glob("*.kv"))) == 20


def test_one_owners_flood_on_disk_evicts_its_own_files_first(tmp_path):
    store = store_in(tmp_path, budget=3000)
    store.put(range(100, 110), b"u" * 800, owner="user:1")
    store.flush()
    for number in range(6):
        store.put(range(number * 10, number * 10 + 10), b"f" * 800, owner="user:2")
        store.flush()
    assert store.longest_match(range(100, 111), owner="user:1")[0] is not None
    assert sum(path.stat().st_size for path in tmp_path.glob("*.kv")) <= 3000
    store.close()
