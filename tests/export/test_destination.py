"""A destination that cannot take the export (issue 27, item 14): one that cannot be written is
refused before any work, and a disk that fills up while writing is reported; both in one line,
exit 2, nothing left behind.

Tests run as root here, whom permission bits do not stop, so a read-only destination is a
read-only bind mount and a full disk a small tmpfs, each in a mount namespace of its own
(`unshare --mount`; skipped where that is not allowed), besides in-process tests that need no
privilege."""

import errno
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from export import repository
from stepnet.cli import main

pytestmark = pytest.mark.timeout(180)
ROOT = Path(__file__).resolve().parents[2]
FIRST_STEP = "building the ONNX graph"      # the export's first progress line: work has started
NOT_WRITABLE = "is not writable (read-only file system or permissions)"


def error_lines(err: str) -> list[str]:
    assert "Traceback" not in err
    return [line for line in err.splitlines() if line.startswith("stepnet export: error: ")]


def export(checkpoint: Path, repo: Path, capsys) -> tuple[int, str]:
    code = main(["export", str(checkpoint), "--repository", str(repo), "--name", "m"])
    return code, capsys.readouterr().err


def test_a_file_in_place_of_a_folder_is_refused_before_any_work(fast_build, tmp_path, capsys):
    (tmp_path / "file").write_text("not a folder")
    code, err = export(fast_build, tmp_path / "file" / "repo", capsys)
    assert code == 2 and FIRST_STEP not in err
    assert err.strip().splitlines() == [f"stepnet export: error: cannot write {tmp_path / 'file' / 'repo' / 'm'}: "
                                        f"{tmp_path / 'file'} is not a folder"]
    assert [p.name for p in tmp_path.iterdir()] == ["file"]


@pytest.mark.parametrize("where", [".", "new/repo"])     # the repository, or a folder to create in it
def test_an_unwritable_folder_is_refused_before_any_work(fast_build, tmp_path, capsys, monkeypatch, where):
    """The nearest folder that exists must be writable, as os.access says (a read-only mount
    answers it so, also for root: the tests below)."""
    read_only = tmp_path / "read-only"
    read_only.mkdir()
    access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: access(path, mode) and not (
        mode & os.W_OK and Path(path) == read_only))
    code, err = export(fast_build, read_only / where, capsys)
    assert code == 2 and FIRST_STEP not in err
    assert err.strip().splitlines() == [f"stepnet export: error: cannot write {read_only / where / 'm'}: "
                                        f"{read_only} {NOT_WRITABLE}"]
    assert not any(read_only.iterdir())


def test_a_full_disk_while_writing_is_one_line(fast_build, tmp_path, capsys, monkeypatch, tree):
    repo = tmp_path / "repo"
    assert export(fast_build, repo, capsys)[0] == 0
    before = tree(repo)
    written = []

    def fills_up(path, data):
        if written:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        written.append(path)
        path.write_bytes(data)

    monkeypatch.setattr(repository, "_write", fills_up)
    code, err = export(fast_build, repo, capsys)
    assert code == 2
    assert error_lines(err) == [f"stepnet export: error: cannot write {repo / 'm' / '2'}: No space left on device; "
                                f"nothing was written"]
    assert err.strip().splitlines()[-1] == error_lines(err)[0]
    assert tree(repo) == before


# A real read-only file system and a real full one, in a mount namespace of the child process.

@pytest.fixture(scope="module")
def export_in_namespace(tmp_path_factory, exports):
    """run(setup, repository, left) -> `stepnet export` of the stepnet checkpoint into repository,
    run by a shell in a mount namespace of its own after the shell commands `setup` (mounts);
    what is then left under the folder `left` is listed on stdout after a line "left:"."""
    probe = tmp_path_factory.mktemp("probe")
    if shutil.which("unshare") is None or subprocess.run(
            ["unshare", "--mount", "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs {probe}"],
            capture_output=True).returncode != 0:
        pytest.skip("needs a mount namespace with mounts (unshare --mount as root)")
    checkpoint = exports.checkpoint("stepnet")

    def run(setup: str, repo: Path, left: Path) -> subprocess.CompletedProcess:
        script = f'{setup} && {{ "$@"; code=$?; echo left:; find {left} -mindepth 1; exit $code; }}'
        command = [sys.executable, "-m", "stepnet.cli", "export", checkpoint, "--repository", repo, "--name", "m"]
        return subprocess.run(["unshare", "--mount", "sh", "-c", script, "sh", *map(str, command)],
                              capture_output=True, text=True, timeout=150, cwd=ROOT)

    return run


def left_behind(stdout: str) -> list[str]:
    return stdout.split("left:\n", 1)[1].split()


@pytest.mark.parametrize("where", [".", "new/repo"])
def test_a_read_only_file_system_is_refused_before_any_work(export_in_namespace, tmp_path, where):
    read_only = tmp_path / "read-only"
    read_only.mkdir()
    result = export_in_namespace(f"mount --bind -o ro {read_only} {read_only}", read_only / where, left=read_only)
    assert result.returncode == 2 and FIRST_STEP not in result.stderr
    assert result.stderr.strip().splitlines() == [f"stepnet export: error: cannot write {read_only / where / 'm'}: "
                                                  f"{read_only} {NOT_WRITABLE}"]
    assert left_behind(result.stdout) == []


def test_a_disk_that_fills_up_is_one_line_and_leaves_nothing(export_in_namespace, tmp_path):
    full = tmp_path / "full"                  # 256 KiB: less than model.onnx (1.2 MB)
    full.mkdir()
    result = export_in_namespace(f"mount -t tmpfs -o size=256k tmpfs {full}", full / "repo", left=full)
    assert result.returncode == 2, result.stderr
    assert error_lines(result.stderr) == [f"stepnet export: error: cannot write {full / 'repo' / 'm' / '1'}: "
                                          f"No space left on device; nothing was written"]
    assert result.stderr.strip().splitlines()[-1] == error_lines(result.stderr)[0]
    assert left_behind(result.stdout) == []
