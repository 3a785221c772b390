"""STEPNET_ADMIN_KEY_FILE: the admin key read from a file (a mounted Kubernetes Secret) once at start,
under the rule of STEPNET_ADMIN_KEY; a file that does not exist leaves the admin endpoints off, as
an optional Secret never created leaves its volume empty."""

import os
import subprocess
import sys

import httpx
import pytest
from pydantic import ValidationError

from service.config.settings import Settings

pytestmark = pytest.mark.timeout(120)

KEY = "file-admin-key-0123456789"
MODEL = "stepnet-digits"


@pytest.fixture(autouse=True)
def no_key_in_the_environment(monkeypatch):
    monkeypatch.delenv("STEPNET_ADMIN_KEY", raising=False)
    monkeypatch.delenv("STEPNET_ADMIN_KEY_FILE", raising=False)


def load(server, key: str) -> httpx.Response:
    return httpx.post(f"{server.url}/v2/repository/models/{MODEL}/load",
                      headers={"Authorization": f"Bearer {key}"}, timeout=30)


def refusal(settings: dict) -> str:
    with pytest.raises(ValidationError) as error:
        Settings(**settings)
    (problem,) = error.value.errors()
    return problem["msg"]


def test_the_key_is_the_file_less_its_trailing_newline(tmp_path, monkeypatch):
    path = tmp_path / "admin-key"
    path.write_text(KEY + "\n")
    monkeypatch.setenv("STEPNET_ADMIN_KEY_FILE", str(path))
    assert Settings().admin_key.get_secret_value() == KEY
    path.write_text(KEY)
    assert Settings().admin_key.get_secret_value() == KEY
    monkeypatch.setenv("STEPNET_ADMIN_KEY_FILE", "")                # an empty variable: unset
    assert Settings().admin_key_file is None and Settings().admin_key is None


@pytest.mark.parametrize("content", [None, "", "\n"], ids=["missing", "empty", "newline"])
def test_a_missing_or_empty_file_leaves_the_admin_endpoints_off(tmp_path, content):
    path = tmp_path / "admin-key"
    if content is not None:
        path.write_text(content)
    assert Settings(admin_key_file=path).admin_key is None


@pytest.mark.parametrize("content", ["short\n", " padded-admin-key-123\n", KEY + "\r\n", KEY + "\n\n"],
                         ids=["short", "padded", "crlf", "two-newlines"])
def test_a_guessable_key_in_the_file_is_refused_naming_the_file(tmp_path, content):
    path = tmp_path / "admin-key"
    path.write_text(content)
    message = refusal({"admin_key_file": path})
    assert str(path) in message and "STEPNET_ADMIN_KEY_FILE" in message and "16 characters" in message


def test_the_key_and_the_file_together_are_refused(tmp_path):
    path = tmp_path / "admin-key"
    path.write_text(KEY)
    assert "both set" in refusal({"admin_key_file": path, "admin_key": KEY})


def test_what_is_not_a_small_regular_text_file_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)                                  # opening it for reading would wait for a writer
    assert "not a regular file" in refusal({"admin_key_file": fifo})
    assert "not a regular file" in refusal({"admin_key_file": tmp_path})
    large = tmp_path / "large"
    large.write_bytes(b"k" * 5000)
    assert "larger than 4096 bytes" in refusal({"admin_key_file": large})
    binary = tmp_path / "binary"
    binary.write_bytes(b"\xff" * 20)
    assert "not UTF-8" in refusal({"admin_key_file": binary})


def test_a_served_key_comes_from_the_file_read_once_at_start(start_server, single_model_repository, tmp_path):
    path = tmp_path / "admin-key"
    path.write_text(KEY + "\n")
    server = start_server(single_model_repository, cli=True, admin_key_file=path)
    assert load(server, KEY).status_code == 200
    assert load(server, KEY[:-1]).status_code == 401
    path.write_text("rotated-admin-key-0123456789\n")     # a rotated Secret takes a restart (docs/kubernetes.md)
    assert load(server, "rotated-admin-key-0123456789").status_code == 401
    assert load(server, KEY).status_code == 200
    assert KEY not in server.log()


@pytest.mark.parametrize("content, env", [("short\n", {}), (KEY + "\n", {"STEPNET_ADMIN_KEY": KEY})],
                         ids=["short", "both"])
def test_a_bad_key_file_is_refused_at_start_in_one_line(single_model_repository, tmp_path, content, env):
    path = tmp_path / "admin-key"
    path.write_text(content)
    result = subprocess.run([sys.executable, "-m", "stepnet.cli", "serve"], capture_output=True, text=True,
                            timeout=60, env={"PATH": "/usr/bin:/bin", "STEPNET_ADMIN_KEY_FILE": str(path), **env,
                                             "STEPNET_MODEL_REPOSITORY": str(single_model_repository)})
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "STEPNET_ADMIN_KEY_FILE" in result.stderr
