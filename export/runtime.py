"""Running an exported graph on ONNX Runtime's CPU provider, as verification and calibration do."""

import numpy as np
import onnx
import onnxruntime as ort

from export.metadata import INPUT, OUTPUTS


def cpu_session(model: onnx.ModelProto | bytes) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3          # errors only: ORT warns about unused initializers
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else model
    return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])


def run(session: ort.InferenceSession, images: np.ndarray,
        batch_sizes: list[int] | int = 64) -> tuple[np.ndarray, ...]:
    """(logits, step_size, nsi) for `images` [N, C, H, W], run in batches: a list gives the
    sizes of the batches in order, an int the size of every batch."""
    if isinstance(batch_sizes, int):
        batch_sizes = [batch_sizes] * -(-len(images) // batch_sizes)
    parts, start = [], 0
    for size in batch_sizes:
        batch = np.ascontiguousarray(images[start:start + size], dtype=np.float32)
        if len(batch):
            parts.append(session.run(list(OUTPUTS), {INPUT: batch}))
        start += size
    return tuple(np.concatenate([p[i] for p in parts]) for i in range(len(OUTPUTS)))
