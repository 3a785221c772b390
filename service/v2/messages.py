"""The protocol's JSON bodies as pydantic models: inference requests are validated with them, and
/docs shows them."""

from typing import Any, Annotated

from pydantic import BaseModel, Field, StrictBool, StrictInt


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class Live(BaseModel):
    live: bool


class Ready(BaseModel):
    ready: bool


class ModelReady(BaseModel):
    name: str
    version: str = Field(description="the version asked for, or the one served by default")
    ready: bool


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int] = Field(description="-1: any size (the batch axis)")


class ModelMetadataResponse(BaseModel):
    name: str
    versions: list[str] = Field(description="the versions served")
    platform: str
    inputs: list[TensorMetadata] = Field(description="a request sends one of them")
    outputs: list[TensorMetadata]


# Bounds on what a request may name, so that an error never echoes an unbounded field
MAX_NAME = 64           # input and output names (the model's are a few characters)
MAX_RANK = 8            # dimensions of an input tensor (the model takes 4)
MAX_TENSORS = 16        # inputs or outputs named in one request
MAX_ID = 256            # the request's id, which the response echoes


class RequestInput(BaseModel):
    name: str = Field(max_length=MAX_NAME)
    shape: list[Annotated[StrictInt, Field(ge=0)]] = Field(max_length=MAX_RANK)
    datatype: str = Field(max_length=MAX_NAME)
    parameters: dict[str, Any] = Field(default_factory=dict,
                                       description="binary_data_size: the tensor follows the JSON as binary data")
    data: list[Any] | None = Field(None, description="row-major, flat or nested; BYTES elements: base64 strings")


class RequestOutput(BaseModel):
    name: str = Field(max_length=MAX_NAME)
    parameters: dict[str, Any] = Field(default_factory=dict,
                                       description="binary_data: true returns the tensor as binary data")


class InferRequest(BaseModel):
    id: str | None = Field(None, max_length=MAX_ID)
    parameters: dict[str, Any] = Field(default_factory=dict,
                                       description="binary_data_output: default of every output's binary_data")
    inputs: list[RequestInput] = Field(min_length=1, max_length=MAX_TENSORS)
    outputs: list[RequestOutput] | None = Field(None, max_length=MAX_TENSORS, description="default: every output")


class ResponseOutput(BaseModel):
    name: str
    datatype: str
    shape: list[int]
    parameters: dict[str, Any] | None = Field(None, description="binary_data_size where sent as binary data")
    data: list[float | None] | None = Field(None, description="row-major, flat; null for NaN (undefined NSI)")


class InferResponse(BaseModel):
    model_name: str
    model_version: str
    id: str | None = None
    outputs: list[ResponseOutput]


class IndexRequest(BaseModel):
    ready: StrictBool = Field(False, description="list only the versions that are ready")


class IndexEntry(BaseModel):
    name: str
    version: str
    state: str = Field(description="READY | LOADING | UNLOADING | UNAVAILABLE")
    reason: str = Field(description="why it is not served; empty when it is")


class RepositoryRequest(BaseModel):
    parameters: dict[str, Any] = Field(default_factory=dict, description="unload: `version` unloads that "
                                                                         "version only")


def inline_schema(model: type[BaseModel]) -> dict:
    """The model's JSON schema with its $defs substituted, for an OpenAPI requestBody."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def resolve(node):
        if isinstance(node, dict):
            if "$ref" in node:
                return resolve(defs[node["$ref"].rsplit("/", 1)[-1]])
            return {key: resolve(value) for key, value in node.items()}
        if isinstance(node, list):
            return [resolve(item) for item in node]
        return node

    return resolve(schema)
