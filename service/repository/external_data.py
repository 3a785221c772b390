"""ONNX external data is refused: a graph must hold all of its tensors.

A TensorProto may keep its bytes in another file (`data_location: EXTERNAL`, a relative
`location`). ONNX Runtime resolves that location against the model's folder, and against the
working directory for a graph loaded from bytes, as the service loads them: such a graph reads
files outside its version folder that model.json's sha256 does not cover (one returned a file of
the working directory to every client as its logits). The project's exporter never writes
external data, so the service refuses it rather than confine it, at two depths:

- external_tensors() finds such tensors in the graph's bytes before any session is made, with
  a minimal protobuf walk (no onnx package in the service: docs/design.md 2), so that the version is
  refused with a reason that names them;
- service.inference.sessions points ONNX Runtime's folder for a graph loaded from bytes
  (`session.model_external_initializers_file_folder_path`) at a path under /dev/null, where no
  file can exist. Whatever the walk does not read (bytes it cannot parse, a field a newer ONNX
  adds), ONNX Runtime can find no external file to load: it refuses absolute locations and ones
  that escape that folder itself.
"""

from collections.abc import Iterator

# field numbers of onnx.proto: for each message that can hold a TensorProto, the fields that lead to one
_FIELDS = {
    "model": {7: "graph", 20: "training_info", 25: "function"},
    "graph": {1: "node", 5: "tensor", 15: "sparse_tensor"},
    "node": {5: "attribute"},
    "attribute": {5: "tensor", 6: "graph", 10: "tensor", 11: "graph", 22: "sparse_tensor", 23: "sparse_tensor"},
    "training_info": {1: "graph", 2: "graph"},
    "function": {7: "node", 11: "attribute"},
    "sparse_tensor": {1: "tensor", 2: "tensor"},
}
_TENSOR_NAME, _EXTERNAL_DATA, _DATA_LOCATION, _EXTERNAL = 8, 13, 14, 1
_MAX_DEPTH = 100                        # protobuf's own recursion limit
_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5


def external_tensors(graph: bytes) -> list[str]:
    """The names of the tensors in an ONNX ModelProto that keep their data in external files
    (unnamed ones as "?"). Bytes that are not protobuf read as far as they parse: ONNX Runtime's
    own parser refuses them, saying why."""
    found: list[str] = []
    view = memoryview(graph)
    todo = [("model", 0, len(view), 0)]          # (message, start, end, depth)
    try:
        while todo:
            kind, start, end, depth = todo.pop()
            if depth > _MAX_DEPTH:
                raise ValueError("messages nested too deeply")
            if kind == "tensor":
                name, external = _tensor(view, start, end)
                if external:
                    found.append(name or "?")
                continue
            for number, value in _fields(view, start, end):
                inner = _FIELDS[kind].get(number)
                if inner is not None and isinstance(value, tuple):
                    todo.append((inner, *value, depth + 1))
    except ValueError:
        pass
    return found


def _tensor(view: memoryview, start: int, end: int) -> tuple[str, bool]:
    name, external = "", False
    for number, value in _fields(view, start, end):
        if number == _TENSOR_NAME and isinstance(value, tuple):
            name = bytes(view[value[0]:value[1]]).decode("utf-8", "replace")
        elif number == _EXTERNAL_DATA or (number == _DATA_LOCATION and value == _EXTERNAL):
            external = True
    return name, external


def _fields(view: memoryview, start: int, end: int) -> Iterator[tuple[int, int | tuple[int, int]]]:
    """(field number, value) of each varint field, (field number, (start, end)) of each
    length-delimited one; fixed-size fields are skipped. ValueError where the bytes are not protobuf."""
    position = start
    while position < end:
        key, position = _varint(view, position, end)
        number, wire = key >> 3, key & 7
        if wire == _VARINT:
            value, position = _varint(view, position, end)
            yield number, value
        elif wire == _LEN:
            length, position = _varint(view, position, end)
            if position + length > end:
                raise ValueError("a field runs past its message")
            yield number, (position, position + length)
            position += length
        elif wire in (_I64, _I32):
            position += 8 if wire == _I64 else 4
        else:
            raise ValueError(f"wire type {wire}")
    if position != end:
        raise ValueError("a field runs past its message")


def _varint(view: memoryview, position: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while position < end and shift < 64:
        byte = view[position]
        position += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, position
        shift += 7
    raise ValueError("a truncated varint")
