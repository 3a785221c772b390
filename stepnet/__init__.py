"""The `stepnet` console command and the error type shared by every package.

This package imports neither torch nor onnxruntime at module level, so the same command runs in
the torch-free serving image (`stepnet serve`) and on a training machine.
"""

__version__ = "0.1.0"
