"""Reproducible performance measurements (issue 6): `stepnet bench` / `make bench`.

    run.py          what is measured, with which settings, and the targets; writes the results
    machine.py      the machine and library versions the numbers belong to
    timing.py       warm-up, repetitions, percentiles
    model_level.py  model level: PyTorch eager vs ONNX Runtime fp32 / int8, diagnostics cost, profiles
    service.py      service level: a real `stepnet serve` under bounded load vs raw session.run
    http_layer.py   what the service's connection limits cost per request
    training.py     training throughput, StepNet-50 against ResNet-50, and `stepnet train` processes
    gpu.py          the GPU part: ONNX Runtime CUDA fp32 / fp16 against PyTorch eager
    report.py       the markdown table and the PNG plots

Results go to benchmarks/results/<machine>-<date>-<HHMM>.json, .md and -*.png; docs/performance.md
explains them. This file imports nothing heavy.
"""
