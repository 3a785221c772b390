"""The wheels a GPU host without a package registry needs, in chunks small enough to travel one
per call (the device tool carries at most 64 MiB a call, the working tree included).

    download()   pip download for CPython 3.12 manylinux x86_64: the serving extra and what the
                 GPU check's clients need, resolved together; onnxconverter-common without its
                 dependencies (onnx, numpy and protobuf are there or in the set)
    pack()       every wheel rewritten uncompressed (same members, so still a valid wheel), one tar,
                 xz over it (about a fifth smaller than the wheels' own deflate, mostly
                 onnxruntime-gpu's CUDA provider), cut into chunks: PARTS/part-NN/wheels.tar.xz.NN,
                 with manifest.json beside each (sha256 and size of every chunk, the archive and
                 every wheel)
    check_parts()  which chunks are here and intact (each carrying call runs it)
    join()       the chunks verified and joined, the archive verified and unpacked, every wheel
                 verified; raises ChunkError naming what is missing or corrupt

Standard library only: it runs on the GPU host before anything is installed.
"""

import hashlib
import io
import json
import lzma
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import tomllib
import zipfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PARTS = ROOT / ".gpu-wheels"
MANIFEST, ARCHIVE = "manifest.json", "wheels.tar.xz"
MiB = 2 ** 20
CALL_LIMIT = 64 * MiB          # what one device call carries, the working tree included
MAX_CHUNK = 59 * MiB           # under 60 MiB whatever the tree weighs
MARGIN = 4 * MiB               # the tree may grow a little before the chunks travel
PYTHON_VERSION = "3.12"
PLATFORMS = ("manylinux2014_x86_64", "manylinux_2_17_x86_64", "manylinux_2_27_x86_64",
             "manylinux_2_28_x86_64")
CHECK_CLIENTS = ("httpx", "tritonclient")              # from the dev extra
UNRESOLVED = ("onnxconverter-common",)                 # from the train extra, --no-deps


class ChunkError(Exception):
    """A chunk or wheel is missing, of the wrong size or hash, or the set is inconsistent."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(MiB):
            digest.update(block)
    return digest.hexdigest()


def _project(requirement: str) -> str:
    """The canonical project name of a requirement or of a wheel's file name."""
    return re.sub(r"[-_.]+", "-", re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0]).lower()


def requirements(pyproject: Path = ROOT / "pyproject.toml") -> tuple[list[str], list[str]]:
    """(resolved together, downloaded without dependencies), with pyproject.toml's pins."""
    project = tomllib.loads(pyproject.read_text())["project"]
    extras = project["optional-dependencies"]
    resolved = project["dependencies"] + extras["serve"]
    resolved += [r for r in extras["dev"] if _project(r) in CHECK_CLIENTS]
    alone = [r for r in extras["train"] if _project(r) in UNRESOLVED]
    return resolved, alone


def download(dest: Path, resolved: list[str], alone: list[str]) -> list[Path]:
    """pip download of both lists into `dest` for CPython PYTHON_VERSION on manylinux x86_64."""
    base = [sys.executable, "-m", "pip", "download", "--dest", str(dest), "--only-binary=:all:",
            "--implementation", "cp", "--python-version", PYTHON_VERSION, "--quiet"]
    base += [arg for platform in PLATFORMS for arg in ("--platform", platform)]
    subprocess.run(base + resolved, check=True)
    subprocess.run(base + ["--no-deps"] + alone, check=True)
    return sorted(dest.glob("*.whl"))


def one_version_each(wheels: list[Path]) -> None:
    """pip refuses a --no-deps install of two versions of one project."""
    seen: dict[str, str] = {}
    for wheel in wheels:
        name = _project(wheel.name.split("-")[0])
        if name in seen:
            raise ChunkError(f"two wheels of {name}: {seen[name]} and {wheel.name}")
        seen[name] = wheel.name


def chunk_limit(tree_bytes: int) -> int:
    """The largest chunk that travels with a working tree of `tree_bytes`."""
    limit = min(MAX_CHUNK, CALL_LIMIT - tree_bytes - MARGIN)
    if limit < MiB:
        raise ChunkError(f"the working tree weighs {tree_bytes / MiB:.1f} MiB: no room for a chunk")
    return limit


def tree_bytes(root: Path = ROOT) -> int:
    """What travels with every call: tracked files and untracked ones git does not ignore."""
    names = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                           cwd=root, capture_output=True, check=True).stdout.split(b"\0")
    return sum((root / name.decode()).stat().st_size for name in names
               if name and (root / name.decode()).is_file())


def _stored(wheel: Path) -> bytes:
    """The wheel with the same members, uncompressed, so that xz sees the bytes themselves."""
    out = io.BytesIO()
    with zipfile.ZipFile(wheel) as source, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as target:
        for info in source.infolist():
            stored = zipfile.ZipInfo(info.filename, info.date_time)
            stored.external_attr, stored.compress_type = info.external_attr, zipfile.ZIP_STORED
            target.writestr(stored, source.read(info))
    return out.getvalue()


def pack(wheels: list[Path], parts: Path, limit: int, preset: int = 6, extra: dict | None = None) -> dict:
    """The wheels as xz chunks of at most `limit` bytes in parts/part-NN/; returns the manifest."""
    one_version_each(wheels)
    if parts.exists():
        shutil.rmtree(parts)
    parts.mkdir(parents=True)
    entries = []
    with tempfile.TemporaryDirectory(prefix="gpu-wheels-") as tmp:
        archive = Path(tmp) / ARCHIVE
        with lzma.open(archive, "wb", preset=preset) as xz, tarfile.open(fileobj=xz, mode="w|") as tar:
            for wheel in sorted(wheels):
                data = _stored(wheel)
                info = tarfile.TarInfo(wheel.name)
                info.size, info.mode = len(data), 0o644
                tar.addfile(info, io.BytesIO(data))
                entries.append({"name": wheel.name, "bytes": len(data),
                                "sha256": hashlib.sha256(data).hexdigest(),
                                "downloaded_bytes": wheel.stat().st_size,
                                "downloaded_sha256": _sha256(wheel)})
        chunks: list[dict] = []
        with open(archive, "rb") as f:
            while data := f.read(limit):
                index = len(chunks)
                part, name = f"part-{index:02d}", f"{ARCHIVE}.{index:02d}"
                (parts / part).mkdir()
                (parts / part / name).write_bytes(data)
                chunks.append({"part": part, "file": name, "bytes": len(data),
                               "sha256": hashlib.sha256(data).hexdigest()})
        manifest = {"format": 1, "archive": {"name": ARCHIVE, "bytes": archive.stat().st_size,
                                             "sha256": _sha256(archive)},
                    "chunk_limit_bytes": limit, "chunks": chunks, "wheels": entries, **(extra or {})}
    text = json.dumps(manifest, indent=1) + "\n"
    for chunk in chunks:
        (parts / chunk["part"] / MANIFEST).write_text(text)
    return manifest


def read_manifest(parts: Path) -> dict:
    """The manifest every part carries; parts of two different packings are refused."""
    found = sorted(parts.glob(f"part-*/{MANIFEST}"))
    if not found:
        raise ChunkError(f"no {parts.name}/part-*/{MANIFEST} here: carry the parts "
                         f"(`make gpu-wheels` makes them)")
    texts = {path.read_text() for path in found}
    if len(texts) > 1:
        raise ChunkError(f"the parts in {parts.name}/ come from different packings: "
                         f"carry every part of one `make gpu-wheels` again")
    return json.loads(texts.pop())


@dataclass(frozen=True)
class PartsStatus:
    intact: list[str]
    missing: list[str]
    corrupt: list[str]           # "part-NN: why"


def check_parts(parts: Path) -> PartsStatus:
    manifest = read_manifest(parts)
    intact, missing, corrupt = [], [], []
    for chunk in manifest["chunks"]:
        path = parts / chunk["part"] / chunk["file"]
        if not path.is_file():
            missing.append(chunk["part"])
        elif path.stat().st_size != chunk["bytes"]:
            corrupt.append(f"{chunk['part']}: {path.stat().st_size} bytes, the manifest says {chunk['bytes']}")
        elif _sha256(path) != chunk["sha256"]:
            corrupt.append(f"{chunk['part']}: sha256 differs from the manifest's")
        else:
            intact.append(chunk["part"])
    return PartsStatus(intact, missing, corrupt)


def join(parts: Path, work: Path) -> tuple[dict, list[Path]]:
    """(manifest, wheel paths): the chunks checked and joined, the archive unpacked into
    work/wheels/ and every wheel checked against the manifest."""
    manifest = read_manifest(parts)
    status = check_parts(parts)
    if status.missing or status.corrupt:
        problems = [f"{part} is missing: carry {parts.name}/{part}" for part in status.missing]
        raise ChunkError("; ".join(problems + [f"{c}: carry it again" for c in status.corrupt]))
    work.mkdir(parents=True, exist_ok=True)
    archive = work / ARCHIVE
    with open(archive, "wb") as out:
        for chunk in manifest["chunks"]:
            with open(parts / chunk["part"] / chunk["file"], "rb") as f:
                shutil.copyfileobj(f, out, MiB)
    if _sha256(archive) != manifest["archive"]["sha256"]:
        raise ChunkError(f"the joined {ARCHIVE} does not match the manifest's sha256")
    wheels_dir = work / "wheels"
    if wheels_dir.exists():
        shutil.rmtree(wheels_dir)
    expected = {entry["name"]: entry for entry in manifest["wheels"]}
    with tarfile.open(archive, "r:xz") as tar:
        members = tar.getmembers()
        unknown = [m.name for m in members if m.name not in expected or not m.isfile()]
        if unknown:
            raise ChunkError(f"the archive holds files the manifest does not list: {unknown[:3]}")
        tar.extractall(wheels_dir, filter="data")
    archive.unlink()
    paths = []
    for name, entry in expected.items():
        path = wheels_dir / name
        if not path.is_file() or path.stat().st_size != entry["bytes"] or _sha256(path) != entry["sha256"]:
            raise ChunkError(f"{name} is missing from the archive or differs from the manifest")
        paths.append(path)
    return manifest, paths
