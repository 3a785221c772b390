"""The stiffness analysis of issue 8 (`stepnet analyze`): trains or loads resnet, se and stepnet
at one depth over several seeds, measures what the diagnostics of docs/design.md 1.3 mean on them
(accuracy, NSI and step size profiles, step size against NSI, stage stiffness ratios, sparse
adaptors) and writes OUT/results.json, OUT/report.md and its figures. study.py runs it, report.py
and plots.py turn its results into the report, cli.py registers the command and imports nothing
heavy, defaults.py holds the defaults both share.
"""
