"""Broken or hostile model folders (issue 27, items 5 to 7 and the smaller findings): each is
refused with a reason, costs a bounded amount of memory and time, and holds back no other model.

- a graph larger than model.json says (3 GB, sparse), a model.json of 3 GB or just over the cap, a
  graph linked to /dev/zero: refused unread, the server's peak RSS stays where it was;
- a FIFO as model.json or serving.json, at start-up and at run time: refused, the healthy model
  is ready, the poll goes on, an admin load answers; a file system that does not answer at all
  (a hung mount, simulated in process) refuses its version or model after a deadline;
- a graph that keeps a tensor as external data (here: the bytes of the server's pyproject.toml,
  read from its working directory, as the fc layer's bias): refused, and onnxruntime itself can
  find no external file either;
- serving.json's types are strict; a version folder linked out of the repository is refused, a
  link inside it is followed.
"""

import asyncio
import os
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.service.conftest import ROOT, copy_version, replace_graph

pytestmark = pytest.mark.timeout(240)

MODEL = "stepnet-digits"
KEY = "hostile-models-admin-key"
ADMIN = {"Authorization": f"Bearer {KEY}"}
SPARSE_BYTES = 3 * 2**30
ALLOWED_GROWTH_MB = 200
NOT_TRIED = ("not loaded", "files still changing")        # the index's reasons for versions not yet tried


def index(server) -> dict[tuple[str, str], tuple[str, str]]:
    return {(e["name"], e["version"]): (e["state"], e.get("reason", ""))
            for e in httpx.get(server.url + "/v2/repository/index", timeout=30).json()}


def wait_until_tried(server, *models: str, timeout: float = 60) -> dict[tuple[str, str], tuple[str, str]]:
    """The index once version 1 of each model is listed and no longer loading (or not yet tried)."""
    deadline = time.monotonic() + timeout
    while True:
        entries = index(server)
        listed = [entries.get((model, "1"), ("absent", "")) for model in models]
        if all(state == "READY" or (state == "UNAVAILABLE" and not reason.startswith(NOT_TRIED))
               for state, reason in listed):
            return entries
        assert time.monotonic() < deadline, f"not tried within {timeout} s: {dict(zip(models, listed))}"
        time.sleep(0.2)


def peak_rss_mb(server) -> float:
    """The server's peak resident memory so far (VmHWM): what a read that is freed again leaves."""
    with open(f"/proc/{server.proc.pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


# ---------------------------------------------------------------- item 5: sizes before reading

@pytest.fixture(scope="module")
def sized(start_server, tmp_path_factory, default_model, publish_version):
    root = tmp_path_factory.mktemp("sizes")
    publish_version(default_model, root, MODEL, 1)
    return start_server(root, repository_poll_s=0.2), root


def test_files_larger_than_they_may_be_are_refused_unread(sized, default_model, publish_version):
    server, root = sized
    before = peak_rss_mb(server)

    def padded(folder):                 # valid JSON, just over the 1 MiB cap
        text = (folder / "model.json").read_text()
        (folder / "model.json").write_text(text + " " * (2**20 + 1 - len(text.encode())))

    publish_version(default_model, root, "sparse-graph", 1,
                    alter=lambda folder: os.truncate(folder / "model.onnx", SPARSE_BYTES))
    publish_version(default_model, root, "sparse-metadata", 1,
                    alter=lambda folder: os.truncate(folder / "model.json", SPARSE_BYTES))
    publish_version(default_model, root, "padded-metadata", 1, alter=padded)
    entries = wait_until_tried(server, "sparse-graph", "sparse-metadata", "padded-metadata")

    grown = peak_rss_mb(server) - before
    print(f"peak RSS {before:.0f} MB before, +{grown:.0f} MB after three oversized files")
    assert grown < ALLOWED_GROWTH_MB
    state, reason = entries[("sparse-graph", "1")]
    assert state == "UNAVAILABLE" and "sparse-graph/1/model.onnx: size or sha256 differs" in reason
    assert f"{SPARSE_BYTES} bytes" in reason
    for model in ("sparse-metadata", "padded-metadata"):
        state, reason = entries[(model, "1")]
        assert state == "UNAVAILABLE" and f"{model}/1/model.json is larger than 1048576 bytes" in reason
    assert index(server)[(MODEL, "1")][0] == "READY"


def test_a_graph_linked_to_dev_zero_is_refused_unread(sized, default_model, publish_version):
    server, root = sized
    before = peak_rss_mb(server)

    def zero(folder):
        (folder / "model.onnx").unlink()
        (folder / "model.onnx").symlink_to("/dev/zero")

    publish_version(default_model, root, "zero-graph", 1, alter=zero)
    state, reason = wait_until_tried(server, "zero-graph")[("zero-graph", "1")]
    assert state == "UNAVAILABLE" and "zero-graph/1/model.onnx resolves outside the model repository" in reason
    assert peak_rss_mb(server) - before < ALLOWED_GROWTH_MB


# ---------------------------------------------------------------- item 6: files whose reads block

def fifo_instead_of(folder: Path, name: str) -> None:
    path = folder / name
    path.unlink(missing_ok=True)
    os.mkfifo(path)


@pytest.fixture(scope="module")
def blocked(start_server, tmp_path_factory, default_model, publish_version):
    """At start-up: the healthy model, one whose model.json is a FIFO and one whose serving.json
    is; both sort before it, as the reported aa-fifo did."""
    root = tmp_path_factory.mktemp("fifos")
    publish_version(default_model, root, MODEL, 1)
    publish_version(default_model, root, "aa-fifo", 1, alter=lambda folder: fifo_instead_of(folder, "model.json"))
    publish_version(default_model, root, "ab-fifo-config", 1)
    fifo_instead_of(root / "ab-fifo-config", "serving.json")
    server = start_server(root, wait=False, repository_poll_s=0.2, admin_key=KEY, default_model=MODEL)
    return server, root


def test_a_fifo_holds_back_no_other_model_at_start_up(blocked, digit_png):
    server, _ = blocked
    started = time.monotonic()
    server.wait_ready(timeout=60)
    print(f"ready {time.monotonic() - started:.1f} s after the test began waiting")
    entries = index(server)
    assert entries[(MODEL, "1")][0] == "READY"
    assert entries[("aa-fifo", "1")] == ("UNAVAILABLE", "aa-fifo/1/model.json is a FIFO, not a regular file")
    state, reason = entries[("ab-fifo-config", "1")]
    assert state == "UNAVAILABLE" and reason == "ab-fifo-config/serving.json is a FIFO, not a regular file"

    assert httpx.post(server.url + "/predict", files={"file": ("d.png", digit_png)}, timeout=30).status_code == 200
    response = httpx.post(server.url + "/predict?model=no-such-model", files={"file": ("d.png", digit_png)},
                          timeout=30)
    assert response.status_code == 404
    assert response.json()["error"]["message"].endswith(f"loaded: {MODEL}")     # not the refused ones


def test_a_fifo_stops_neither_the_poll_nor_admin_calls(blocked, default_model, publish_version):
    server, root = blocked
    publish_version(default_model, root, "ac-fifo", 1, alter=lambda folder: fifo_instead_of(folder, "model.json"))
    state, reason = wait_until_tried(server, "ac-fifo", timeout=30)[("ac-fifo", "1")]
    assert (state, reason) == ("UNAVAILABLE", "ac-fifo/1/model.json is a FIFO, not a regular file")

    publish_version(default_model, root, MODEL, 2)                  # the poll still loads what comes
    deadline = time.monotonic() + 30
    while index(server).get((MODEL, "2"), ("",))[0] != "READY":
        assert time.monotonic() < deadline, "version 2 was not loaded by the poll"
        time.sleep(0.2)

    for model, says in (("aa-fifo", "aa-fifo/1/model.json is a FIFO"),
                        ("ab-fifo-config", "ab-fifo-config/serving.json is a FIFO")):
        started = time.monotonic()
        response = httpx.post(f"{server.url}/v2/repository/models/{model}/load", json={}, headers=ADMIN,
                              timeout=30)
        assert time.monotonic() - started < 10
        assert 400 <= response.status_code < 500 and says in response.json()["error"], response.text
    assert "Traceback" not in server.log()


def test_a_file_system_that_does_not_answer_refuses_only_what_lies_on_it(tmp_path, default_model, monkeypatch):
    """In process, with a 2 s deadline: model.json of one model and serving.json of another
    never answer (a hung mount). Start-up ends, the healthy model serves, the two are refused
    with the reason; the next sync does not wait again, and once the file system answers an
    admin load brings the version up."""
    from service.config import serving as serving_config
    from service.repository import loader as loader_module
    from service.config.settings import Settings
    from service.core.errors import ModelLoadError
    from service.repository.loader import Loader
    from service.telemetry.metrics import Metrics
    from service.repository.model_files import FileCalls
    from service.repository.model_repository import Repository

    for name in (MODEL, "hung-metadata", "hung-config"):
        copy_version(default_model, tmp_path, name, 1)
    mount = threading.Event()                  # set: the mount answers again
    read_metadata, read_config = loader_module.read_metadata, serving_config.read

    def hangs(real, model):
        def read(folder, *args):
            if model in str(folder):
                mount.wait(60)
            return real(folder, *args)
        return read

    monkeypatch.setattr(loader_module, "read_metadata", hangs(read_metadata, "hung-metadata"))
    monkeypatch.setattr(serving_config, "read", hangs(read_config, "hung-config"))
    settings = Settings(model_repository=tmp_path, max_batch_size=2, instances=1)
    metrics = Metrics()
    repository = Repository(settings, metrics, Loader(settings, metrics, FileCalls(timeout_s=2)))

    async def scenario():
        started = time.monotonic()
        await repository.load_all()
        assert time.monotonic() - started < 20 and repository.ready
        states = {(r.name, r.version): (r.state.value, r.error) for r in repository.records()}
        assert states[(MODEL, 1)][0] == "ready"
        for name in ("hung-metadata", "hung-config"):
            state, error = states[(name, 1)]
            assert state == "failed" and "the file system did not answer within 2 s" in error, error

        started = time.monotonic()
        await repository.sync_all(settle=True)          # still hanging: not waited for again
        assert time.monotonic() - started < 1
        with pytest.raises(ModelLoadError, match="has not answered for"):
            await repository.load("hung-metadata")

        mount.set()
        deadline = time.monotonic() + 5
        while True:                                     # the stuck thread returns
            try:
                await repository.load("hung-metadata")
                break
            except ModelLoadError:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
        assert repository.versions("hung-metadata") == [1]
        await repository.close(1)

    try:
        asyncio.run(scenario())
    finally:
        mount.set()


# ---------------------------------------------------------------- item 7, strict types, symbolic links

def external_graph(default_model: Path, location: str, length: int = 40) -> bytes:
    """The default graph with its fc layer's bias (10 floats) kept as external data at `location`."""
    import onnx

    graph = onnx.load(str(default_model / "model.onnx"))
    bias = next(t for t in graph.graph.initializer if t.name == "model.fc.bias")
    bias.ClearField("raw_data")
    bias.data_location = onnx.TensorProto.EXTERNAL
    for key, value in {"location": location, "offset": "0", "length": str(length)}.items():
        entry = bias.external_data.add()
        entry.key, entry.value = key, value
    return graph.SerializeToString()


@pytest.fixture(scope="module")
def hostile(start_server, tmp_path_factory, default_model, publish_version):
    root = tmp_path_factory.mktemp("hostile") / "repository"
    publish_version(default_model, root, MODEL, 1)
    # its bias is the first 40 bytes of pyproject.toml, in the server's working directory
    publish_version(default_model, root, "external", 1,
                    alter=lambda folder: replace_graph(folder, external_graph(default_model, "pyproject.toml")))
    publish_version(default_model, root, "stringly", 1)
    (root / "stringly" / "serving.json").write_text('{"max_batch_size": "8"}')
    outside = copy_version(default_model, root.parent / "elsewhere", "linked-out", 1)
    (root / "linked-out").mkdir()
    (root / "linked-out" / "1").symlink_to(outside)
    publish_version(default_model, root, "linked-in", 1)
    (root / "linked-in" / "1" / "model.onnx").unlink()
    (root / "linked-in" / "1" / "model.onnx").symlink_to(root / MODEL / "1" / "model.onnx")
    return start_server(root, default_model=MODEL)


def test_a_graph_with_external_data_is_refused(hostile, default_model, digit_png):
    assert (ROOT / "pyproject.toml").is_file()
    state, reason = index(hostile)[("external", "1")]
    assert state == "UNAVAILABLE" and "external/1/model.onnx keeps tensors as external data" in reason
    assert "model.fc.bias" in reason
    response = httpx.post(hostile.url + "/predict?model=external", files={"file": ("d.png", digit_png)},
                          timeout=30)
    assert response.status_code == 404


def test_onnxruntime_finds_no_external_file_either(tmp_path, default_model, monkeypatch):
    """The second lock (service.inference.sessions): a session made from bytes, beside the file its graph
    names, in the working directory, still loads no external data."""
    from service.core.errors import ModelLoadError
    from service.inference.placement import Device
    from service.inference.sessions import Session

    (tmp_path / "secret.bin").write_bytes(np.arange(10, dtype=np.float32).tobytes())
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelLoadError, match="cannot load the model"):
        Session(external_graph(default_model, "secret.bin"), Device("cpu", "test"), None, 1,
                ("logits", "step_size", "nsi"), "external:1")


def test_external_data_is_found_wherever_a_graph_can_hold_a_tensor(default_model):
    from onnx import TensorProto, helper, numpy_helper

    from service.repository.external_data import external_tensors

    def tensor(name):
        t = numpy_helper.from_array(np.zeros(2, np.float32), name)
        t.ClearField("raw_data")
        t.data_location = TensorProto.EXTERNAL
        entry = t.external_data.add()
        entry.key, entry.value = "location", "data.bin"
        return t

    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])
    branch = helper.make_graph([helper.make_node("Identity", ["in_branch"], ["y"])], "branch", [], [out],
                               [tensor("in_branch")])
    sparse = helper.make_sparse_tensor(tensor("sparse_values"), numpy_helper.from_array(np.array([0], np.int64),
                                                                                         "idx"), [2])
    nodes = [helper.make_node("Constant", [], ["c"], value=tensor("in_constant")),
             helper.make_node("If", ["cond"], ["y"], then_branch=branch, else_branch=branch)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("cond", TensorProto.BOOL, [])], [out],
                              [tensor("initializer")], sparse_initializer=[sparse])
    function = helper.make_function("local", "f", [], ["z"], [helper.make_node("Constant", [], ["z"],
                                                                               value=tensor("in_function"))],
                                    [helper.make_opsetid("", 18)])
    model = helper.make_model(graph, functions=[function])
    assert sorted(external_tensors(model.SerializeToString())) == sorted(
        ["in_branch", "in_branch", "sparse_values", "in_constant", "initializer", "in_function"])
    assert external_tensors((default_model / "model.onnx").read_bytes()) == []
    assert external_tensors(b"this is not an onnx graph" * 40) == []


def test_serving_json_types_are_strict(hostile):
    state, reason = index(hostile)[("stringly", "1")]
    assert state == "UNAVAILABLE" and "stringly/serving.json is invalid: max_batch_size" in reason


def test_a_version_folder_linked_out_of_the_repository_is_refused(hostile):
    state, reason = index(hostile)[("linked-out", "1")]
    assert state == "UNAVAILABLE"
    assert reason == "linked-out/1/model.json resolves outside the model repository (a symbolic link out of it)"
    assert index(hostile)[("linked-in", "1")][0] == "READY"        # a link inside it is followed
    assert hostile.log().count("resolves to") == 1                 # the log has the paths
