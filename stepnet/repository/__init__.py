"""The model repository's contract shared by the export and the service (DESIGN 2.1), torch- and
onnxruntime-free: what a model name and a version folder may be called."""

from stepnet.repository.names import (MODEL_NAME_RULE, VERSION_PATTERN, VERSION_RULE, is_version,
                                      parse_version, valid_model_name)

__all__ = ["MODEL_NAME_RULE", "VERSION_PATTERN", "VERSION_RULE", "is_version", "parse_version",
           "valid_model_name"]
