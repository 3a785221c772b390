"""The test and training images the export runs through the graph, and the one batching loop."""

from collections.abc import Iterator

import numpy as np
import onnxruntime as ort
import torch

from export import runtime


def evenly_spaced(n: int, k: int) -> np.ndarray:
    """k indices evenly spread over range(n) (all of them when k >= n): an image folder lists its
    images class by class, so the first k would miss classes."""
    if k >= n:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, k).round().astype(np.int64))


def chunks(n: int, sizes: int | list[int]) -> Iterator[slice]:
    """Consecutive slices of range(n): of `sizes` each, or of the listed sizes in order."""
    if isinstance(sizes, int):
        sizes = [sizes] * -(-n // sizes)
    start = 0
    for size in sizes:
        if start < n and size > 0:
            yield slice(start, min(n, start + size))
        start += size


def load_images(dataset, indices) -> tuple[np.ndarray, np.ndarray]:
    """Images [N, C, H, W] float32 (already preprocessed by the dataset) and labels [N]."""
    images, labels = zip(*(dataset[int(i)] for i in indices))
    return torch.stack(images).numpy(), np.asarray(labels, dtype=np.int64)


def batches(dataset, indices: np.ndarray, batch_size: int = 64) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(images, labels) of dataset[indices], loaded batch by batch."""
    for part in chunks(len(indices), batch_size):
        yield load_images(dataset, indices[part])


def run_graph(session: ort.InferenceSession, dataset, indices: np.ndarray,
              batch_size: int = 64) -> tuple[np.ndarray, ...]:
    """(logits, step_size, nsi, labels) of the graph over dataset[indices]."""
    parts = [(*runtime.run(session, images, batch_size), labels)
             for images, labels in batches(dataset, indices, batch_size)]
    return tuple(np.concatenate([p[i] for p in parts]) for i in range(4))
