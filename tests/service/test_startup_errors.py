"""Start-up mistakes that only show once the server tries to run (issue 27, item 13): a port in
use, a host that does not resolve, a stiffness history too large to hold. `stepnet serve` says so
in one line and exits 2, as for any bad setting, rather than printing a traceback or starting a
server that never becomes ready."""

import os
import socket
import subprocess
import sys

import pytest

from tests.service.conftest import ROOT, free_port

pytestmark = pytest.mark.timeout(120)
EXIT_WITHIN_S = 30      # each refusal below takes about 1 s; a server that starts would run on


def serve(*args, before: str = "", **env) -> subprocess.CompletedProcess:
    """`stepnet serve ARGS` in a child process, with STEPNET_* from env only (the gRPC port a
    free one unless given); `before`: Python that process runs first."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("STEPNET_")}
    environ.update({"STEPNET_GRPC_PORT": str(free_port()), **env})
    script = f"import sys\nimport stepnet.cli\n{before}\nsys.exit(stepnet.cli.main(['serve', *sys.argv[1:]]))"
    return subprocess.run([sys.executable, "-c", script, *map(str, args)], capture_output=True, text=True,
                          timeout=EXIT_WITHIN_S, env=environ, cwd=ROOT)


def assert_one_line(result: subprocess.CompletedProcess, *words: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("stepnet serve: error: ")
    for word in words:
        assert word in line


@pytest.fixture()
def taken_port():
    """A port where another process listens."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        yield listener.getsockname()[1]


def test_http_port_in_use(single_model_repository, taken_port):
    result = serve("--model-repository", single_model_repository, "--port", taken_port)
    assert_one_line(result, f"127.0.0.1:{taken_port}", "STEPNET_PORT", "in use")


def test_grpc_port_in_use(single_model_repository, taken_port):
    result = serve("--model-repository", single_model_repository, "--port", free_port(),
                      STEPNET_GRPC_PORT=str(taken_port))
    assert_one_line(result, f"127.0.0.1:{taken_port}", "STEPNET_GRPC_PORT", "in use")


def test_one_port_for_both(single_model_repository):
    port = free_port()
    result = serve("--model-repository", single_model_repository, "--port", port, STEPNET_GRPC_PORT=str(port))
    assert_one_line(result, "STEPNET_GRPC_PORT", "in use")


def test_a_host_that_does_not_resolve(single_model_repository):
    result = serve("--model-repository", single_model_repository, "--host", "no-such-host.invalid")
    assert_one_line(result, "STEPNET_HOST", "no-such-host.invalid")


def test_a_stiffness_history_too_large_to_hold(single_model_repository):
    result = serve("--model-repository", single_model_repository, STEPNET_STIFFNESS_HISTORY="1000000000000")
    assert_one_line(result, "STEPNET_STIFFNESS_HISTORY", "100000")


# A port taken after the check above and before the server listens (a race the check cannot
# close) fails where it happens: the server logs what it did so far, then one error line, exit 2.
SKIP_CHECK = "import service.cli; service.cli._check_listeners = lambda settings: None"


@pytest.mark.parametrize("transport", ["http", "grpc"])
def test_a_port_taken_after_the_check(transport, single_model_repository, taken_port):
    ports = {"http": ("--port", taken_port), "grpc": ("--port", free_port())}[transport]
    env = {"STEPNET_GRPC_PORT": str(taken_port)} if transport == "grpc" else {}
    result = serve("--model-repository", single_model_repository, "--host", "127.0.0.1", *ports,
                      before=SKIP_CHECK, **env)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("stepnet serve: error: ") and f"127.0.0.1:{taken_port}" in last
    assert ("STEPNET_GRPC_PORT" if transport == "grpc" else "STEPNET_PORT") in last
