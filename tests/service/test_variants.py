"""STEPNET_VARIANT: the service serves model.int8.onnx (or fp16) where a version lists it in
model.json, and model.onnx, with a warning, where it does not. (Real int8 and fp16 graphs and
their accuracy are the export's tests; here the variant file is a relabelled copy of model.onnx,
so the answers must not change.)"""

import hashlib
import json
import time

import httpx
import onnx


def _add_int8(folder) -> None:
    filename = "model.int8.onnx"
    proto = onnx.load(str(folder / "model.onnx"))
    proto.doc_string += f" ({filename}, test copy)"
    data = proto.SerializeToString()
    (folder / filename).write_bytes(data)
    meta = json.loads((folder / "model.json").read_text())
    meta["files"][filename] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    (folder / "model.json").write_text(json.dumps(meta))


def test_configured_variant_is_served_where_present(start_server, publish_version, default_model,
                                                    tmp_path, digit_png):
    publish_version(default_model, tmp_path, "with-int8", 1, alter=_add_int8)
    publish_version(default_model, tmp_path, "plain", 1)
    server = start_server(tmp_path, variant="int8", default_model="with-int8")

    models = {m["name"]: m for m in httpx.get(server.url + "/models", timeout=10).json()["models"]}
    assert models["with-int8"]["file"] == "model.int8.onnx"
    assert models["plain"]["file"] == "model.onnx"
    assert "plain:1 has no model.int8.onnx listed in model.json; serving model.onnx" in server.log()

    answers = [httpx.post(f"{server.url}/predict?model={name}", files={"file": digit_png},
                          timeout=10).json() for name in ("with-int8", "plain")]
    assert [a["predictions"][0]["index"] for a in answers] == [answers[1]["predictions"][0]["index"]] * 2
    assert answers[0]["layers"] == answers[1]["layers"]


def test_altered_variant_file_is_refused(start_server, publish_version, default_model, tmp_path):
    folder = publish_version(default_model, tmp_path, "m", 1, alter=_add_int8)
    with open(folder / "model.int8.onnx", "ab") as fh:
        fh.write(b"\0")
    server = start_server(tmp_path, variant="int8", wait=False)
    deadline = time.monotonic() + 60
    while "size or sha256 differs" not in server.log() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert "model.int8.onnx: size or sha256 differs from model.json" in server.log()
    assert httpx.get(server.url + "/readyz", timeout=5).status_code == 503
