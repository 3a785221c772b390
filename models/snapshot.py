"""Training snapshots: everything a run needs to go on exactly where it stopped.

    OUT/snapshot/snapshot.pt     model, optimizer, scheduler and GradScaler states, the position
                                 (epoch, step in the epoch, the epoch's running sums), RNG states
    OUT/snapshot/snapshot.json   what the run is (architecture, data, recipe, seed, precision,
                                 global batch) and where it stands, readable without torch

Both are written through a temporary name and a rename, snapshot.pt first, so a reader finds a
complete pair or the previous one. They live in their own folder beside the final checkpoint,
which `stepnet export` and `stepnet evaluate` read; the folder is removed when training ends.
The .pt file holds tensors, numbers and strings only and is loaded with weights_only=True.
"""

import json
import os
import random
from pathlib import Path

import numpy as np
import torch

from stepnet.errors import UserError

FOLDER, STATE, INFO = "snapshot", "snapshot.pt", "snapshot.json"
FORMAT_VERSION = 1
# what must match for --resume: a different value is another run, not this one continued
ARCHITECTURE_KEYS = ("model", "dataset", "train_images", "ink_margin")


def folder(out: Path) -> Path:
    return out / FOLDER


def exists(out: Path) -> bool:
    return (folder(out) / INFO).is_file() and (folder(out) / STATE).is_file()


def rng_state() -> dict:
    state = np.random.get_state(legacy=True)
    assert isinstance(state, tuple)              # the global RandomState (MT19937): the legacy form
    kind, keys, pos, has_gauss, gauss = state
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "python": random.getstate(),
            "numpy": (kind, keys.tolist(), pos, has_gauss, gauss)}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, np.uint32), pos, has_gauss, gauss))


def save(out: Path, identity: dict, position: dict, states: dict) -> None:
    target = folder(out)
    target.mkdir(exist_ok=True)
    tmp = target / (STATE + ".tmp")
    torch.save({"format_version": FORMAT_VERSION, "position": position, "rng": rng_state(), **states}, tmp)
    os.replace(tmp, target / STATE)
    tmp = target / (INFO + ".tmp")
    tmp.write_text(json.dumps({"format_version": FORMAT_VERSION, "identity": identity,
                               "position": position}, indent=2) + "\n")
    os.replace(tmp, target / INFO)


def read_info(out: Path) -> dict:
    """snapshot.json of OUT; UserError when there is none."""
    path = folder(out) / INFO
    if not exists(out):
        raise UserError(f"--resume: {out} holds no training snapshot ({FOLDER}/{INFO} and {STATE}); "
                        f"start the run without --resume")
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"--resume: {path} is unreadable ({exc})") from None
    if info.get("format_version") != FORMAT_VERSION:
        raise UserError(f"--resume: {path} is not a snapshot of format {FORMAT_VERSION}")
    return info


def check_identity(saved: dict, wanted: dict) -> None:
    """--resume continues the run the snapshot is of: refuse any difference, in one line."""
    differences = [key for key in sorted(saved.keys() | wanted.keys()) if saved.get(key) != wanted.get(key)]
    if not differences:
        return
    kind = ("a different architecture or dataset" if set(differences) & set(ARCHITECTURE_KEYS)
            else "different training settings")
    shown = "; ".join(f"{key}: snapshot {saved.get(key)!r}, now {wanted.get(key)!r}" for key in differences[:3])
    raise UserError(f"--resume: this command asks for {kind} than the snapshot's ({shown}); resume "
                    f"with the command that started the run")


def load_state(out: Path, map_location) -> dict:
    state = torch.load(folder(out) / STATE, map_location=map_location, weights_only=True)
    set_rng_state(state["rng"])
    return state
