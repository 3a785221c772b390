"""Several versions of a model, explicit versions on /predict and v2, the repository index, and
the admin endpoints: off without STEPNET_ADMIN_KEY, refused without the right key, and with it
unloading versions down to the last one (then the model is 404, not 500) and loading it back."""

import base64

import httpx
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

pytestmark = pytest.mark.timeout(120)

MODEL = "stepnet-digits"
KEY = "s3cret-admin-key"
ADMIN = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def versioned_repository(tmp_path_factory, default_model, publish_version):
    root = tmp_path_factory.mktemp("versions")
    for version in (1, 2):
        publish_version(default_model, root, MODEL, version)
    return root


@pytest.fixture(scope="module")
def admin_server(start_server, versioned_repository):
    return start_server(versioned_repository, admin_key=KEY)


def triton_client(server) -> triton.InferenceServerClient:
    return triton.InferenceServerClient(server.url.removeprefix("http://"), network_timeout=30)


def predict(server, png: bytes, **params) -> httpx.Response:
    return httpx.post(server.url + "/predict", files={"file": ("d.png", png)}, params=params, timeout=30)


def v2_infer(server, png: bytes, version: str | None = None) -> httpx.Response:
    path = f"/v2/models/{MODEL}" + (f"/versions/{version}" if version else "") + "/infer"
    body = {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                        "data": [base64.b64encode(png).decode()]}], "outputs": [{"name": "logits"}]}
    return httpx.post(server.url + path, json=body, timeout=30)


def index(server) -> dict[str, str]:
    return {e["version"]: e["state"] for e in httpx.get(server.url + "/v2/repository/index").json()
            if e["name"] == MODEL}


def unload(server, version: int | None = None) -> httpx.Response:
    body = {"parameters": {"version": str(version)}} if version else {}
    return httpx.post(f"{server.url}/v2/repository/models/{MODEL}/unload", json=body, headers=ADMIN, timeout=30)


def test_admin_endpoints_are_off_without_a_key(server):
    client = triton_client(server)
    for call in (client.load_model, client.unload_model):
        with pytest.raises(InferenceServerException) as error:
            call(MODEL, headers=ADMIN)
        assert error.value.status() == "403" and "STEPNET_ADMIN_KEY" in error.value.message()
    assert client.is_model_ready(MODEL)
    client.close()


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY},
                                     {"Authorization": f"Basic {KEY}"}])
def test_admin_endpoints_refuse_a_missing_or_wrong_key(admin_server, headers):
    for action in ("load", "unload"):
        response = httpx.post(f"{admin_server.url}/v2/repository/models/{MODEL}/{action}", headers=headers)
        assert response.status_code == 401 and isinstance(response.json()["error"], str)
        assert response.headers["www-authenticate"].startswith("Bearer")
    assert index(admin_server) == {"1": "READY", "2": "READY"}


def test_explicit_versions_and_the_latest_as_default(admin_server, digit_png):
    assert index(admin_server) == {"1": "READY", "2": "READY"}
    assert predict(admin_server, digit_png).json()["version"] == 2
    assert predict(admin_server, digit_png, version=1).json()["version"] == 1
    assert v2_infer(admin_server, digit_png).json()["model_version"] == "2"
    assert v2_infer(admin_server, digit_png, "1").json()["model_version"] == "1"
    client = triton_client(admin_server)
    assert client.get_model_metadata(MODEL)["versions"] == ["1", "2"]
    assert client.is_model_ready(MODEL, "1") and client.is_model_ready(MODEL, "2")
    client.close()


def test_unloading_down_to_the_last_version_then_loading_back(admin_server, digit_png):
    assert unload(admin_server, 2).status_code == 200
    assert index(admin_server)["2"] in ("UNLOADING", "UNAVAILABLE")
    assert predict(admin_server, digit_png).json()["version"] == 1
    gone = predict(admin_server, digit_png, version=2)
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "version_not_found"

    assert unload(admin_server, 1).status_code == 200              # the last version
    response = predict(admin_server, digit_png)
    assert response.status_code == 404 and response.json()["error"]["code"] == "model_not_found"
    response = v2_infer(admin_server, digit_png)
    assert response.status_code == 404 and isinstance(response.json()["error"], str)
    assert httpx.get(f"{admin_server.url}/v2/models/{MODEL}/ready").status_code == 404

    client = triton_client(admin_server)
    assert not client.is_model_ready(MODEL)
    client.load_model(MODEL, headers=ADMIN)                         # undoes the unloads
    assert client.is_model_ready(MODEL)
    assert predict(admin_server, digit_png).json()["version"] == 2
    assert index(admin_server) == {"1": "READY", "2": "READY"}

    client.unload_model(MODEL, headers=ADMIN)                       # the whole model at once
    assert predict(admin_server, digit_png).status_code == 404
    assert set(index(admin_server).values()) <= {"UNLOADING", "UNAVAILABLE"}
    client.load_model(MODEL, headers=ADMIN)
    assert predict(admin_server, digit_png).status_code == 200
    client.close()


@pytest.mark.parametrize("model, body, status", [
    ("no-such-model", {}, 404),
    ("a..b", {}, 400),
    (MODEL, {"parameters": {"config": "{}"}}, 400),
    (MODEL, [1], 400),
])
def test_admin_load_of_what_cannot_be_loaded(admin_server, model, body, status):
    response = httpx.post(f"{admin_server.url}/v2/repository/models/{model}/load", json=body, headers=ADMIN)
    assert response.status_code == status and isinstance(response.json()["error"], str)


def test_admin_unload_of_what_is_not_there(admin_server):
    response = httpx.post(f"{admin_server.url}/v2/repository/models/no-such-model/unload", headers=ADMIN)
    assert response.status_code == 404
    response = unload(admin_server, 9)
    assert response.status_code == 404 and isinstance(response.json()["error"], str)
    assert "Traceback" not in admin_server.log()
