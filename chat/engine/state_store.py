"""Saved sequence states on disk: per-conversation KV that outlives slot eviction and restarts.

A bounded directory of files, each holding one evaluated token prefix and its state (the bytes of
`llama_state_seq_get_data`), keyed by a fingerprint (the model file and every setting that shapes the
cells: `state_fingerprint`) and the tokens. Beside the in-memory PrefixCache (prefix_cache.py): the
engine puts a state here when it reclaims a slot and at shutdown, and reads one in the request's own
thread when it holds more of the prompt than memory does. Writes go through one writer thread with a
bounded queue, so `put` never blocks the decode loop (a full queue drops the write; at shutdown `put`
waits instead). A file that is corrupt, truncated, written for another fingerprint, or rejected by
llama.cpp is ignored and removed. The files hold conversation tokens: the directory is private to its
user (0o700, files 0o600). Each file records whose state it is and how much of it is the site's own content:
another owner's prompt reuses only that (prefix_cache.reusable_across). It is kept under its byte budget by removing the least recently used files
(modification time, touched on every hit) of the owner holding the most bytes (prefix_cache.fair_victims).
"""

from __future__ import annotations

import hashlib
import logging
import os
import queue
import struct
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from .prefix_cache import common_prefix_length, fair_victims, reusable_across

logger = logging.getLogger(__name__)

MAGIC = b"LLMSITE-KV3\n"  # KV2: the fingerprint covers the settings that shape the cells; KV3: owner and shared
SUFFIX = ".kv"
DIGEST = 16  # bytes of the blake2b checksum at the end of each file
WRITE_QUEUE = 8  # states waiting to be written; more are dropped (except at shutdown: put(wait=...))
SAMPLED_BLOCKS = 15  # blocks read across a model file for its fingerprint, besides its first and last bytes
STALE_TEMPORARY_SECONDS = 60.0  # a half-written file older than this was left by a process that died writing it


def model_fingerprint(path: str | os.PathLike, *, sample: int = 4 << 20, block: int = 64 << 10) -> str:
    """A stable id of a model file's contents, fast on GBs: its size, its first and last `sample` bytes and
    SAMPLED_BLOCKS blocks spread over the rest (a fine-tune that keeps the header and the last tensors differs
    somewhere in between)."""
    size = os.path.getsize(path)
    digest = hashlib.blake2b(str(size).encode(), digest_size=16)
    with open(path, "rb") as file:
        digest.update(file.read(sample))
        for index in range(1, SAMPLED_BLOCKS + 1):
            file.seek(size * index // (SAMPLED_BLOCKS + 1))
            digest.update(file.read(block))
        if size > sample:
            file.seek(max(sample, size - sample))
            digest.update(file.read(sample))
    return digest.hexdigest()


def state_fingerprint(model: str, settings: dict) -> str:
    """The key of states that may be restored into each other: the model file's fingerprint and the settings that
    shape the saved cells (flash attention, prompt chunking, KV cache types, the llama.cpp version)."""
    text = model + "".join(f"\n{name}={settings[name]!r}" for name in sorted(settings))
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).hexdigest()


def tokens_key(tokens: Sequence[int], owner: str = "") -> str:
    digest = hashlib.blake2b(struct.pack(f"<{len(tokens)}I", *tokens), digest_size=16)
    digest.update(owner.encode("utf-8"))
    return digest.hexdigest()


@dataclass(frozen=True)
class StoredState:
    tokens: tuple[int, ...]
    state: bytes
    owner: str = ""
    shared: int = 0


@dataclass(frozen=True)
class _Header:
    owner: str
    shared: int
    tokens: tuple[int, ...]


class StateStore:
    """A directory of saved states for one model file, bounded by `budget_bytes`. Thread-safe."""

    def __init__(self, directory: str | os.PathLike, *, fingerprint: str, budget_bytes: int):
        self.directory = Path(directory)
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:  # the files hold conversations: only this user may list or read them
            self.directory.chmod(0o700)
        except OSError:
            logger.warning("state store: could not make %s private (0o700)", self.directory)
        self.fingerprint = fingerprint
        self.budget_bytes = budget_bytes
        self._lock = threading.Lock()
        self._index: dict[Path, _Header] = {}  # this model's files: whose, and the tokens each holds
        self._queue: queue.Queue = queue.Queue(WRITE_QUEUE)
        self._read_lock = threading.Lock()  # one file read at a time; a burst of one prompt reads it once
        self._last_read: StoredState | None = None
        self.dropped_writes = 0
        self._scan()
        self._writer = threading.Thread(target=self._write_loop, name="state-store-writer", daemon=True)
        self._writer.start()

    # -- reading -----------------------------------------------------------------------------------

    def longest_match(self, tokens: Sequence[int], *, better_than: int = 0, owner: str = "",
                      shared: int = 0) -> tuple[StoredState | None, int]:
        """The stored state sharing the longest prefix with `tokens` that a prompt of `owner` (its first `shared`
        tokens the site's own) may reuse, and that length; (None, 0) when none shares more than `better_than`
        tokens (what memory already holds: no file is read then). A file found unreadable on the way is removed
        and the next best is tried."""
        with self._read_lock:
            while True:
                with self._lock:
                    best, best_length = None, better_than
                    for path, header in self._index.items():
                        length = reusable_across(common_prefix_length(header.tokens, tokens), saved_owner=header.owner,
                                                 saved_shared=header.shared, owner=owner, shared=shared)
                        if length > best_length:
                            best, best_length = path, length
                if best is None:
                    return None, 0
                last = self._last_read
                loaded = last if last is not None and self._path(last.tokens, last.owner) == best else self._read(best)
                if loaded is not None:
                    self._last_read = loaded
                    try:
                        os.utime(best)  # recently used
                    except OSError:
                        pass
                    return loaded, best_length
                self._discard(best)

    def discard(self, tokens: Sequence[int], owner: str = "") -> None:
        """Remove `owner`'s file of `tokens` (llama.cpp rejected its state)."""
        logger.warning("state store: a state of %d tokens was rejected by the model; removed", len(tokens))
        self._discard(self._path(tokens, owner))

    def __len__(self) -> int:
        with self._lock:
            return len(self._index)

    # -- writing -----------------------------------------------------------------------------------

    def put(self, tokens: Sequence[int], state: bytes, *, wait: float = 0.0, owner: str = "", shared: int = 0) -> bool:
        """Queue a state of `owner`'s (its first `shared` tokens the site's own) for writing; False (dropped) when
        the writer is behind. Never blocks unless `wait` (seconds; at shutdown, when every slot's state is put at
        once and none may be lost)."""
        item = (tuple(tokens), bytes(state), owner, shared)
        try:
            self._queue.put(item, timeout=wait) if wait else self._queue.put_nowait(item)
            return True
        except queue.Full:
            self.dropped_writes += 1
            if wait:
                logger.warning("state store: a state of %d tokens was not written within %g s", len(tokens), wait)
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

    def _path(self, tokens: Sequence[int], owner: str = "") -> Path:
        return self.directory / f"{self.fingerprint[:16]}-{tokens_key(tokens, owner)}{SUFFIX}"

    def _scan(self) -> None:
        now = time.time()
        for path in self.directory.glob("*.tmp"):  # a write cut short by a crash never became a state
            try:
                if now - path.stat().st_mtime > STALE_TEMPORARY_SECONDS:
                    _remove(path)
            except OSError:
                pass
        for path in sorted(self.directory.glob(f"*{SUFFIX}")):
            header = self._read_header(path)
            if header is None:
                logger.warning("state store: %s is unreadable or belongs to another model file; removed", path.name)
                _remove(path)
                continue
            self._index[path] = header

    def _read_header(self, path: Path) -> _Header | None:
        """Whose state a file of this model is and its tokens, None if it is foreign or malformed (the checksum is
        checked on read)."""
        try:
            with open(path, "rb") as file:
                if file.read(len(MAGIC)) != MAGIC or file.read(32).decode("ascii", "replace") != self.fingerprint:
                    return None
                (owner_size,) = struct.unpack("<H", file.read(2))
                owner = file.read(owner_size).decode("utf-8")
                shared, count = struct.unpack("<II", file.read(8))
                raw = file.read(4 * count)
                if len(raw) != 4 * count or path != self._path(struct.unpack(f"<{count}I", raw), owner):
                    return None
                return _Header(owner, shared, struct.unpack(f"<{count}I", raw))
        except (OSError, struct.error, UnicodeDecodeError):
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
        (owner_size,) = struct.unpack_from("<H", body, offset)
        owner = body[offset + 2:offset + 2 + owner_size].decode("utf-8", "replace")
        offset += 2 + owner_size
        shared, count = struct.unpack_from("<II", body, offset)
        offset += 8
        tokens = struct.unpack_from(f"<{count}I", body, offset)
        offset += 4 * count
        (length,) = struct.unpack_from("<Q", body, offset)
        offset += 8
        state = body[offset:offset + length]
        if len(state) != length:
            return None
        return StoredState(tokens=tuple(tokens), state=state, owner=owner, shared=shared)

    def _discard(self, path: Path) -> None:
        with self._lock:
            self._index.pop(path, None)
            last = self._last_read
            if last is not None and self._path(last.tokens, last.owner) == path:
                self._last_read = None
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

    def _write(self, tokens: tuple[int, ...], state: bytes, owner: str = "", shared: int = 0) -> None:
        owner_bytes = owner.encode("utf-8")
        body = b"".join([MAGIC, self.fingerprint.encode("ascii"), struct.pack("<H", len(owner_bytes)), owner_bytes,
                         struct.pack("<II", shared, len(tokens)), struct.pack(f"<{len(tokens)}I", *tokens),
                         struct.pack("<Q", len(state)), state])
        if len(body) + DIGEST > self.budget_bytes:
            return
        path = self._path(tokens, owner)
        temporary = path.with_name(f"{path.stem}.{os.getpid()}.tmp")  # processes sharing the directory never collide
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            with os.fdopen(descriptor, "wb") as file:
                file.write(body + hashlib.blake2b(body, digest_size=DIGEST).digest())
            os.replace(temporary, path)  # readers see a whole file or none
        except BaseException:
            _remove(temporary)
            raise
        with self._lock:
            # The owner's stored prefix of these tokens is now redundant (another owner's stays: see PrefixCache).
            for other in [p for p, h in self._index.items() if h.owner == owner and h.shared <= shared
                          and len(h.tokens) <= len(tokens) and tokens[:len(h.tokens)] == h.tokens]:
                self._index.pop(other)
                if other != path:
                    _remove(other)
            self._index[path] = _Header(owner, shared, tokens)
        self._evict(keep=path)

    def _evict(self, *, keep: Path | None = None) -> None:
        """Fit the budget, fairly (prefix_cache.fair_victims); `keep`, the file just written, goes last."""
        files = []
        for path in list(self._index):
            try:
                stat = path.stat()
            except OSError:
                self._discard(path)
                continue
            files.append((stat.st_mtime, stat.st_size, path))
        with self._lock:
            owners = {path: header.owner for path, header in self._index.items()}
        ordered = [(owners.get(path, ""), size, path) for _, size, path in sorted(files)]  # least recently used first
        for path in fair_victims(ordered, self.budget_bytes, keep=keep):
            self._discard(path)


def _remove(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass


def _join_with_timeout(work: queue.Queue, timeout: float) -> None:
    done = threading.Event()
    threading.Thread(target=lambda: (work.join(), done.set()), daemon=True).start()
    done.wait(timeout)
