"""The calibration profile of DESIGN 1.3 and the test accuracy, both measured on the exported
graph with ONNX Runtime over real test images.

Profile, per layer over the calibration samples: mean and standard deviation (ddof 0) of the step
size (the per-sample channel mean of h_t, step_size[:, l, 0]) and of ln NSI (natural log;
null for the first block of a stage, where NSI is undefined).
"""

import numpy as np
import onnxruntime as ort
import torch

from export import runtime

CALIBRATION_SAMPLES = 2000


def spread(n: int, k: int) -> np.ndarray:
    """k indices evenly spread over range(n) (all of them when k >= n): an image folder lists its
    images class by class, so the first k would miss classes."""
    if k >= n:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, k).round().astype(np.int64))


def load_images(dataset, indices) -> tuple[np.ndarray, np.ndarray]:
    """Images [N, C, H, W] float32 (already preprocessed by the dataset) and labels [N]."""
    images, labels = zip(*(dataset[int(i)] for i in indices))
    return torch.stack(images).numpy(), np.asarray(labels, dtype=np.int64)


def run_graph(session: ort.InferenceSession, dataset, indices: np.ndarray,
              batch_size: int = 64) -> tuple[np.ndarray, ...]:
    """(logits, step_size, nsi, labels) of the graph over dataset[indices], loaded chunk by chunk."""
    parts = []
    for start in range(0, len(indices), batch_size):
        images, labels = load_images(dataset, indices[start:start + batch_size])
        parts.append((*runtime.run(session, images, batch_size), labels))
    return tuple(np.concatenate([p[i] for p in parts]) for i in range(4))


def profile(step_size: np.ndarray, nsi: np.ndarray, layers: list[dict], dataset: str) -> dict:
    """The reference profile stored in the metadata; step_size [N, L, 3], nsi [N, L]."""
    rows = []
    for i, layer in enumerate(layers):
        steps = step_size[:, i, 0].astype(np.float64)
        row = {"name": layer["name"], "step_size_mean": float(steps.mean()),
               "step_size_std": float(steps.std()), "log_nsi_mean": None, "log_nsi_std": None}
        if layer["nsi_defined"]:
            with np.errstate(divide="ignore", invalid="ignore"):
                log_nsi = np.log(nsi[:, i].astype(np.float64))
            if not np.all(np.isfinite(log_nsi)):
                raise ValueError(f"{layer['name']}: NSI is zero or undefined on calibration inputs")
            row["log_nsi_mean"], row["log_nsi_std"] = float(log_nsi.mean()), float(log_nsi.std())
        rows.append(row)
    return {"dataset": dataset, "samples": int(len(step_size)), "layers": rows}
