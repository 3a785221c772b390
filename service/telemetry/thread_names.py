"""Threads named for the operating system as well as for Python (Python 3.11 names its threads for
itself only), so that `top -H`, py-spy and /proc/PID/task/*/comm tell the server's threads apart
and its CPU can be split by what each does (benchmarks.serving_path): `event-loop` (HTTP, FastAPI,
gRPC's Python side), `preprocess_N`, `infer-<model>...`, `onnxruntime` (ONNX Runtime's own pool,
which inherits the name of the thread that makes a session), `asyncio_N` (file reads, v2 decoding).
Linux keeps the first 15 bytes; elsewhere naming does nothing."""

import contextlib
import ctypes
import ctypes.util
import sys
import threading
from collections.abc import Iterator

PR_SET_NAME, PR_GET_NAME = 15, 16
_LIBC = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True) if sys.platform == "linux" else None


def set_os_name(name: str) -> None:
    """The calling thread's name for the operating system."""
    if _LIBC is not None:
        _LIBC.prctl(PR_SET_NAME, name.encode("ascii", "replace")[:15], 0, 0, 0)


def os_name() -> str:
    if _LIBC is None:
        return ""
    buffer = ctypes.create_string_buffer(16)
    _LIBC.prctl(PR_GET_NAME, buffer, 0, 0, 0)
    return buffer.value.decode("ascii", "replace")


def name_this_thread() -> None:
    """A ThreadPoolExecutor initializer: the operating system's name is the Python one."""
    set_os_name(threading.current_thread().name)


@contextlib.contextmanager
def os_thread_name(name: str) -> Iterator[None]:
    """Threads started inside (ONNX Runtime's, as a session is made) inherit this name."""
    previous = os_name()
    set_os_name(name)
    try:
        yield
    finally:
        set_os_name(previous)
