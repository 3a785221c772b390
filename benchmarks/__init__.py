"""Reproducible performance measurements (issue 6): `stepnet bench` / `make bench`.

    run.py       what is measured, with which settings, and the targets; writes the results
    machine.py   the machine and library versions the numbers belong to
    timing.py    warm-up, repetitions, percentiles
    models.py    model level: PyTorch eager vs ONNX Runtime fp32 / int8, diagnostics cost, profiles
    service.py   service level: a real `stepnet serve` under bounded load vs raw session.run
    report.py    the markdown table and the PNG plots

Results go to benchmarks/results/<machine>-<date>.json, .md and -*.png; docs/performance.md
explains them. This file imports nothing heavy.
"""
