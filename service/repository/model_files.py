"""Reading the model repository's files as untrusted input: a model folder may be broken or
hostile, and one that is must cost a bounded amount of memory and time, and hold back no other.

- Only regular files are read. A path is stat'ed before it is opened, so that a FIFO, a device
  (/dev/zero) or a socket in a file's place is refused unopened; it is opened with O_NONBLOCK
  (opening a FIFO does not wait for a writer) and O_NOFOLLOW, and fstat'ed again, which catches a
  file swapped in between.
- A file is sized before it is read: model.json and serving.json against a cap, a graph against
  the size model.json records for it. A 3 GB sparse model.onnx beside a valid model.json is
  refused unread; at most what model.json vouches for (and protobuf's 2 GiB) is ever read.
- Every file resolves inside the repository. A model folder, version folder or file that is a
  symbolic link out of it is refused, checked on the resolved path before opening and on the
  opened file after (/proc/self/fd), so that a link swapped in between is refused too. A link
  inside the repository (version 2's model.onnx to version 1's) is followed.
- Every call that touches the repository's files runs in a daemon thread of its own and is
  awaited for a bounded time (FileCalls): a file on a hung network mount refuses its version
  (or model) with a reason after READ_TIMEOUT_S, and nothing else waits on it.
"""

import asyncio
import os
import stat
import threading
import time
from collections.abc import Callable, Hashable
from concurrent import futures
from pathlib import Path
from typing import TypeVar

from service.core.errors import ModelLoadError

T = TypeVar("T")

MAX_METADATA_BYTES = 1024 * 1024       # model.json: a depth-1202 network's takes about 200 KB
MAX_GRAPH_BYTES = 2**31 - 1            # protobuf's limit, and so ONNX Runtime's without external data
READ_TIMEOUT_S = 30.0                  # for a file system's answer; a graph gets more, by its size
MIN_READ_BYTES_PER_S = 10 * 2**20      # the slowest storage a graph may load from in time

_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def read_file(path: Path, root: Path, limit: int, size: int | None = None) -> bytes:
    """The bytes of `path`, a regular file inside `root` of at most `limit` bytes and, when
    given, exactly `size` bytes. Raises ModelLoadError (public message: the path relative to the
    repository) when it is none of these, OSError (FileNotFoundError...) when it cannot be read."""
    where = path.relative_to(root).as_posix()
    real_root = os.path.realpath(root)
    real = os.path.realpath(path)
    found = os.stat(real)
    if not _inside(real, real_root):
        raise _outside(path, real, where)
    _check(found, where, limit, size)
    fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    with open(fd, "rb") as f:
        length = _check(os.fstat(fd), where, limit, size)
        opened = _opened_path(fd)
        if opened is not None and not _inside(opened, real_root):
            raise _outside(path, opened, where)
        data = f.read(length + 1)
    if len(data) != length:
        raise ModelLoadError(f"{where} changed while it was read (still being written?)")
    return data


def _check(st: os.stat_result, where: str, limit: int, size: int | None) -> int:
    if not stat.S_ISREG(st.st_mode):
        kind = next((name for test, name in _KINDS if test(st.st_mode)), "not a file")
        raise ModelLoadError(f"{where} is {kind}, not a regular file")
    if size is not None and st.st_size != size:
        raise ModelLoadError(f"{where}: size or sha256 differs from model.json ({st.st_size} bytes, "
                             f"model.json says {size}; file truncated or altered, or still being copied)")
    if st.st_size > limit:
        raise ModelLoadError(f"{where} is larger than {limit} bytes ({st.st_size})")
    return st.st_size


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _outside(path: Path, real: str, where: str) -> ModelLoadError:
    return ModelLoadError(f"{path} resolves to {real}, outside the model repository",
                          f"{where} resolves outside the model repository (a symbolic link out of it)")


def _opened_path(fd: int) -> str | None:
    """Where the file open as `fd` lies, or None where the system does not say (no /proc)."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return None


class Unanswered(ModelLoadError):
    """The file system did not answer in time (a hung mount), or has not yet answered an earlier
    call about the same thing. `waited`: this call is the one that timed out."""

    def __init__(self, message: str, waited: bool):
        super().__init__(message)
        self.waited = waited


class FileCalls:
    """Blocking calls about the repository's files, each in a daemon thread of its own (a thread
    pool would fill with hung calls, and a pool's threads are joined at exit), awaited at most
    `timeout_s`, plus `size / MIN_READ_BYTES_PER_S` for a large file. A call that timed out keeps
    its thread; until it returns, a new call about the same key (a folder, a file) is refused at
    once instead of starting another, so that a hung mount holds one thread per thing on it."""

    def __init__(self, timeout_s: float = READ_TIMEOUT_S):
        self.timeout_s = timeout_s
        self._stuck: dict[Hashable, float] = {}       # key -> since when a call about it hangs
        self._lock = threading.Lock()

    async def run(self, key: Hashable, what: str, call: Callable[..., T], *args: object, size: int = 0) -> T:
        """call(*args) for `what` (a public name: model, version or file, no host path)."""
        future = self._start(key, what, call, args)
        timeout_s = self.timeout_s + size / MIN_READ_BYTES_PER_S
        answer = asyncio.wrap_future(future)
        try:
            await asyncio.wait({answer}, timeout=timeout_s)
        finally:
            if not answer.done():            # left to its thread: its outcome is not wanted
                answer.cancel()
        if answer.cancelled():
            raise self._timed_out(key, what, future, timeout_s)
        return answer.result()

    def run_blocking(self, key: Hashable, what: str, call: Callable[..., T], *args: object) -> T:
        """run() for code outside the event loop (start-up's discovery)."""
        future = self._start(key, what, call, args)
        if not futures.wait({future}, self.timeout_s).done:
            raise self._timed_out(key, what, future, self.timeout_s)
        return future.result()

    def _start(self, key: Hashable, what: str, call: Callable[..., T], args: tuple) -> "futures.Future[T]":
        with self._lock:
            since = self._stuck.get(key)
        if since is not None:
            raise Unanswered(f"{what}: the file system has not answered for {time.monotonic() - since:.0f} s "
                             f"(a hung mount?); tried again once it does", waited=False)
        future: futures.Future[T] = futures.Future()

        def work() -> None:
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(call(*args))
                except BaseException as exc:
                    future.set_exception(exc)

        threading.Thread(target=work, name=f"files: {what}", daemon=True).start()
        return future

    def _timed_out(self, key: Hashable, what: str, future: "futures.Future[T]", timeout_s: float) -> Unanswered:
        with self._lock:
            self._stuck[key] = time.monotonic() - timeout_s
        future.add_done_callback(lambda _: self._answered(key))
        return Unanswered(f"{what}: the file system did not answer within {round(timeout_s, 1):g} s "
                          f"(a hung mount?)", waited=True)

    def _answered(self, key: Hashable) -> None:
        with self._lock:
            self._stuck.pop(key, None)
