"""Checkpoint -> ONNX model repository (docs/design.md 1.3, 1.4, 2.1): BatchNorm folding, one fused
`ai.stepnet` node per residual block, diagnostics outputs, verification against PyTorch, the
calibration profile and atomic writes.

From Python: `export.export_checkpoint(checkpoint_dir, repository, name, version=None, ...)`
returns the version folder. This file imports nothing heavy, so that `stepnet --help` stays instant
(export_checkpoint is loaded on first use).
"""


def __getattr__(name):
    if name == "export_checkpoint":
        from export.pipeline import export_checkpoint
        return export_checkpoint
    raise AttributeError(f"module 'export' has no attribute {name!r}")
