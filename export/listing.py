"""The node list of an exported graph, as `stepnet graph` prints it: one line per node, with the
`ai.stepnet` step nodes named after their layer. Needs onnx only (no torch)."""

from pathlib import Path

import onnx

from stepnet.repository import STEP_DOMAIN


def load(path: str | Path) -> onnx.ModelProto:
    return onnx.load(str(path), load_external_data=False)


def describe(proto: onnx.ModelProto) -> str:
    weights = {t.name for t in proto.graph.initializer}
    ops = [f"{n.domain}::{n.op_type}" if n.domain else n.op_type for n in proto.graph.node]
    width = max(map(len, ops), default=2)
    lines = [f"{'#':>4}  {'op':<{width}}  {'layer':<14}  inputs -> outputs (weights left out)"]
    for i, (node, op) in enumerate(zip(proto.graph.node, ops)):
        layer = node.name if node.domain == STEP_DOMAIN else ""
        inputs = ", ".join(v for v in node.input if v and v not in weights)
        lines.append(f"{i:>4}  {op:<{width}}  {layer:<14}  {inputs} -> {', '.join(node.output)}")
    steps = sum(n.domain == STEP_DOMAIN for n in proto.graph.node)
    functions = ", ".join(f"{f.domain}::{f.name} ({len(f.node)} standard ops)" for f in proto.functions)
    lines += ["", f"{len(proto.graph.node)} nodes, {steps} of them {STEP_DOMAIN} steps "
                  f"(one per residual block)", f"functions: {functions or 'none'}"]
    return "\n".join(lines)
