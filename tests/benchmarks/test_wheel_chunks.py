"""The wheels' way to a GPU host: packed into chunks that travel one per call, joined and checked
there. Small generated wheels stand in for the real ones (`make gpu-wheels` downloads those)."""

import hashlib
import json
import os
import zipfile

import pytest

from benchmarks import gpu_check, wheel_chunks
from benchmarks.wheel_chunks import ChunkError

pytestmark = pytest.mark.timeout(60)
KiB = 1024


def make_wheel(folder, name: str, payload: bytes):
    """A small wheel: a module, its payload (incompressible random bytes) and the dist-info."""
    path = folder / f"{name}-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as wheel:
        wheel.writestr(f"{name}/__init__.py", "VALUE = 1\n")
        wheel.writestr(f"{name}/payload.bin", payload)
        wheel.writestr(f"{name}-1.0.dist-info/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    return path


def members(path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as wheel:
        return {name: wheel.read(name) for name in wheel.namelist()}


@pytest.fixture
def packed(tmp_path):
    """Two wheels of 150 KiB and 20 KiB, packed into chunks of at most 64 KiB."""
    source = tmp_path / "download"
    source.mkdir()
    wheels = [make_wheel(source, "alpha", os.urandom(150 * KiB)), make_wheel(source, "beta", os.urandom(20 * KiB))]
    parts = tmp_path / "parts"
    manifest = wheel_chunks.pack(wheels, parts, 64 * KiB, preset=0)
    return wheels, parts, manifest


def test_chunks_are_within_the_limit_and_listed_in_every_part(packed):
    _, parts, manifest = packed
    chunks = manifest["chunks"]
    assert len(chunks) == 3 and [c["part"] for c in chunks] == ["part-00", "part-01", "part-02"]
    assert sorted(p.name for p in parts.iterdir()) == ["part-00", "part-01", "part-02"]
    for chunk in chunks:
        data = (parts / chunk["part"] / chunk["file"]).read_bytes()
        assert len(data) == chunk["bytes"] <= 64 * KiB
        assert hashlib.sha256(data).hexdigest() == chunk["sha256"]
        assert json.loads((parts / chunk["part"] / "manifest.json").read_text()) == manifest
    assert sum(c["bytes"] for c in chunks) == manifest["archive"]["bytes"]


def test_joined_wheels_hold_the_same_files(packed, tmp_path):
    wheels, parts, manifest = packed
    assert wheel_chunks.check_parts(parts).intact == ["part-00", "part-01", "part-02"]
    _, joined = wheel_chunks.join(parts, tmp_path / "work")
    assert [p.name for p in joined] == sorted(w.name for w in wheels)
    for original, copy in zip(sorted(wheels), joined):
        assert members(copy) == members(original)           # stored instead of deflated: a valid wheel still
        assert hashlib.sha256(copy.read_bytes()).hexdigest() == next(
            w["sha256"] for w in manifest["wheels"] if w["name"] == copy.name)


def test_a_corrupt_chunk_is_refused_and_named(packed, tmp_path):
    _, parts, manifest = packed
    chunk = parts / "part-01" / manifest["chunks"][1]["file"]
    data = bytearray(chunk.read_bytes())
    data[100] ^= 0xFF
    chunk.write_bytes(bytes(data))
    status = wheel_chunks.check_parts(parts)
    assert status.intact == ["part-00", "part-02"] and status.corrupt == ["part-01: sha256 differs from the manifest's"]
    with pytest.raises(ChunkError, match="part-01: sha256 differs.*carry it again"):
        wheel_chunks.join(parts, tmp_path / "work")
    chunk.write_bytes(bytes(data[:-1]))
    with pytest.raises(ChunkError, match="part-01: .* bytes, the manifest says"):
        wheel_chunks.join(parts, tmp_path / "work")


def test_a_missing_part_is_named_with_the_folder_to_carry(packed, tmp_path, capsys):
    _, parts, _ = packed
    for path in (parts / "part-02").iterdir():
        path.unlink()
    (parts / "part-02").rmdir()
    assert wheel_chunks.check_parts(parts).missing == ["part-02"]
    with pytest.raises(ChunkError, match="part-02 is missing: carry parts/part-02"):
        wheel_chunks.join(parts, tmp_path / "work")
    assert gpu_check.verify(parts, complete=False) == 0           # a carrying call before the last
    assert gpu_check.verify(parts, complete=True) == 1
    assert "intact: part-00, part-01; missing: part-02" in capsys.readouterr().out


def test_parts_of_two_packings_are_refused(packed, tmp_path):
    wheels, parts, _ = packed
    other = wheel_chunks.pack(wheels[:1], tmp_path / "other", 64 * KiB, preset=0)
    (parts / "part-00" / "manifest.json").write_text(json.dumps(other))
    with pytest.raises(ChunkError, match="different packings"):
        wheel_chunks.join(parts, tmp_path / "work")


def test_two_versions_of_one_project_are_refused(tmp_path):
    first = make_wheel(tmp_path, "alpha", b"1")
    second = first.with_name("alpha-2.0-py3-none-any.whl")
    second.write_bytes(first.read_bytes())
    with pytest.raises(ChunkError, match="two wheels of alpha"):
        wheel_chunks.pack([first, second], tmp_path / "parts", 64 * KiB, preset=0)


def test_chunk_size_leaves_room_for_the_working_tree():
    mib = wheel_chunks.MiB
    assert wheel_chunks.chunk_limit(0) == 59 * mib                         # under 60 MiB whatever the tree
    assert wheel_chunks.chunk_limit(8 * mib) == (64 - 8 - 4) * mib         # 64 MiB a call, a margin of 4
    with pytest.raises(ChunkError, match="no room"):
        wheel_chunks.chunk_limit(60 * mib)


def test_requirements_are_the_serving_extra_and_the_checks_clients():
    resolved, alone = wheel_chunks.requirements()
    names = {wheel_chunks._project(r) for r in resolved}
    assert {"onnxruntime-gpu", "fastapi", "tritonclient", "httpx", "grpcio", "numpy"} <= names
    assert "torch" not in names and "torchvision" not in names          # the GPU host's own
    assert [wheel_chunks._project(r) for r in alone] == ["onnxconverter-common"]
