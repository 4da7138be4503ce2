"""Saved sequence states on disk: per-conversation KV that outlives slot eviction and restarts.

A bounded directory of files, each holding one evaluated token prefix and its state (the bytes of
`llama_state_seq_get_data`), keyed by the model file's fingerprint and the tokens. Beside the
in-memory PrefixCache (prefix_cache.py): the engine puts a state here when it reclaims a slot and
at shutdown, and looks here when memory has no match. Writes go through one writer thread with a
bounded queue, so `put` never blocks the decode loop (a full queue drops the write). A file that
is corrupt, truncated, or written for another model file is ignored and removed. The directory is
kept under its byte budget by removing the least recently used files (modification time, touched
on every hit).
"""

from __future__ import annotations

import hashlib
import logging
import os
import queue
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from .prefix_cache import common_prefix_length

logger = logging.getLogger(__name__)

MAGIC = b"LLMSITE-KV1\n"
SUFFIX = ".kv"
DIGEST = 16  # bytes of the blake2b checksum at the end of each file
WRITE_QUEUE = 8  # states waiting to be written; more are dropped


def model_fingerprint(path: str | os.PathLike, *, sample: int = 4 << 20) -> str:
    """A stable id of a model file's contents: its size and its first and last `sample` bytes (fast on GBs)."""
    size = os.path.getsize(path)
    digest = hashlib.blake2b(str(size).encode(), digest_size=16)
    with open(path, "rb") as file:
        digest.update(file.read(sample))
        if size > sample:
            file.seek(max(sample, size - sample))
            digest.update(file.read(sample))
    return digest.hexdigest()


def tokens_key(tokens: Sequence[int]) -> str:
    return hashlib.blake2b(struct.pack(f"<{len(tokens)}I", *tokens), digest_size=16).hexdigest()


@dataclass(frozen=True)
class StoredState:
    tokens: tuple[int, ...]
    state: bytes


class StateStore:
    """A directory of saved states for one model file, bounded by `budget_bytes`. Thread-safe."""

    def __init__(self, directory: str | os.PathLike, *, fingerprint: str, budget_bytes: int):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.fingerprint = fingerprint
        self.budget_bytes = budget_bytes
        self._lock = threading.Lock()
        self._index: dict[Path, tuple[int, ...]] = {}  # this model's files and the tokens each holds
        self._queue: queue.Queue = queue.Queue(WRITE_QUEUE)
        self.dropped_writes = 0
        self._scan()
        self._writer = threading.Thread(target=self._write_loop, name="state-store-writer", daemon=True)
        self._writer.start()

    # -- reading -----------------------------------------------------------------------------------

    def longest_match(self, tokens: Sequence[int]) -> tuple[StoredState | None, int]:
        """The stored state sharing the longest prefix with `tokens`, and that length; (None, 0) when none.
        A file found unreadable on the way is removed and the next best is tried."""
        while True:
            with self._lock:
                best, best_length = None, 0
                for path, stored in self._index.items():
                    length = common_prefix_length(stored, tokens)
                    if length > best_length:
                        best, best_length = path, length
            if best is None:
                return None, 0
            loaded = self._read(best)
            if loaded is not None:
                try:
                    os.utime(best)  # recently used
                except OSError:
                    pass
                return loaded, best_length
            self._discard(best)

    def __len__(self) -> int:
        with self._lock:
            return len(self._index)

    # -- writing -----------------------------------------------------------------------------------

    def put(self, tokens: Sequence[int], state: bytes) -> bool:
        """Queue a state for writing; False (dropped) when the writer is behind. Never blocks."""
        try:
            self._queue.put_nowait((tuple(tokens), bytes(state)))
            return True
        except queue.Full:
            self.dropped_writes += 1
            return False

    def flush(self, timeout: float | None = None) -> None:
        """Wait until every queued state is written (shutdown)."""
        self._queue.join() if timeout is None else _join_with_timeout(self._queue, timeout)

    def close(self, timeout: float = 30.0) -> None:
        self.flush(timeout)
        if self._queue.unfinished_tasks:  # the disk is slower than the shutdown allows: say so
            logger.warning("state store: %d state(s) not written within %g s of shutdown", self._queue.unfinished_tasks,
                           timeout)
        try:
            self._queue.put_nowait(None)
        except queue.Full:
            pass

    # -- internals ---------------------------------------------------------------------------------

    def _path(self, tokens: Sequence[int]) -> Path:
        return self.directory / f"{self.fingerprint[:16]}-{tokens_key(tokens)}{SUFFIX}"

    def _scan(self) -> None:
        for path in sorted(self.directory.glob(f"*{SUFFIX}")):
            header = self._read_header(path)
            if header is None:
                logger.warning("state store: %s is unreadable or belongs to another model file; removed", path.name)
                _remove(path)
                continue
            self._index[path] = header

    def _read_header(self, path: Path) -> tuple[int, ...] | None:
        """The tokens of a file of this model, None if it is foreign or malformed (the checksum is checked on read)."""
        try:
            with open(path, "rb") as file:
                if file.read(len(MAGIC)) != MAGIC or file.read(32).decode("ascii", "replace") != self.fingerprint:
                    return None
                (count,) = struct.unpack("<I", file.read(4))
                raw = file.read(4 * count)
                if len(raw) != 4 * count:
                    return None
                return struct.unpack(f"<{count}I", raw)
        except (OSError, struct.error):
            return None

    def _read(self, path: Path) -> StoredState | None:
        try:
            data = path.read_bytes()
        except OSError:
            return None
        body, digest = data[:-DIGEST], data[-DIGEST:]
        if len(data) <= len(MAGIC) + 32 + 4 + DIGEST or hashlib.blake2b(body, digest_size=DIGEST).digest() != digest:
            logger.warning("state store: %s is corrupt; removed", path.name)
            return None
        offset = len(MAGIC)
        if body[offset:offset + 32].decode("ascii", "replace") != self.fingerprint:
            return None
        offset += 32
        (count,) = struct.unpack_from("<I", body, offset)
        offset += 4
        tokens = struct.unpack_from(f"<{count}I", body, offset)
        offset += 4 * count
        (length,) = struct.unpack_from("<Q", body, offset)
        offset += 8
        state = body[offset:offset + length]
        if len(state) != length:
            return None
        return StoredState(tokens=tuple(tokens), state=state)

    def _discard(self, path: Path) -> None:
        with self._lock:
            self._index.pop(path, None)
        _remove(path)

    def _write_loop(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                self._write(*item)
            except Exception:
                logger.exception("state store: a write failed")
            finally:
                self._queue.task_done()

    def _write(self, tokens: tuple[int, ...], state: bytes) -> None:
        body = b"".join([MAGIC, self.fingerprint.encode("ascii"), struct.pack("<I", len(tokens)),
                         struct.pack(f"<{len(tokens)}I", *tokens), struct.pack("<Q", len(state)), state])
        if len(body) + DIGEST > self.budget_bytes:
            return
        path = self._path(tokens)
        temporary = path.with_suffix(".tmp")
        temporary.write_bytes(body + hashlib.blake2b(body, digest_size=DIGEST).digest())
        os.replace(temporary, path)  # readers see a whole file or none
        with self._lock:
            # A stored prefix of these tokens is now redundant.
            for other in [p for p, t in self._index.items() if len(t) <= len(tokens) and tokens[:len(t)] == t]:
                self._index.pop(other)
                if other != path:
                    _remove(other)
            self._index[path] = tokens
        self._evict()

    def _evict(self) -> None:
        files = []
        for path in list(self._index):
            try:
                stat = path.stat()
            except OSError:
                self._discard(path)
                continue
            files.append((stat.st_mtime, stat.st_size, path))
        total = sum(size for _, size, _ in files)
        for _, size, path in sorted(files):  # the least recently used first
            if total <= self.budget_bytes:
                break
            self._discard(path)
            total -= size


def _remove(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass


def _join_with_timeout(work: queue.Queue, timeout: float) -> None:
    done = threading.Event()
    threading.Thread(target=lambda: (work.join(), done.set()), daemon=True).start()
    done.wait(timeout)
