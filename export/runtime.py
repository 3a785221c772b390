"""Running an exported graph on ONNX Runtime's CPU provider, as verification and calibration do."""

import numpy as np
import onnx
import onnxruntime as ort

from stepnet.repository import INPUT, OUTPUTS


def cpu_session(model: onnx.ModelProto | bytes) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3          # errors only: ORT warns about unused initializers
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else model
    return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])


def run(session: ort.InferenceSession, images: np.ndarray,
        batch_sizes: list[int] | int = 64) -> tuple[np.ndarray, ...]:
    """(logits, step_size, nsi) for `images` [N, C, H, W], run in batches: a list gives the
    sizes of the batches in order, an int the size of every batch."""
    from export.samples import chunks

    parts = [session.run(list(OUTPUTS), {INPUT: np.ascontiguousarray(images[part], dtype=np.float32)})
             for part in chunks(len(images), batch_sizes)]
    return tuple(np.concatenate([p[i] for p in parts]) for i in range(len(OUTPUTS)))
