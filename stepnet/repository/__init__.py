"""The model repository's contract, shared by the export and the service (docs/design.md 2.1), free of
torch and onnxruntime: names and the version rule, file names, the metadata of model.json, and
the states a served version goes through."""

from stepnet.repository.layout import (INPUT, METADATA_FILE, METADATA_KEY, MODEL_FILE, OUTPUTS,
                                       PARTIAL, REPLACED, STEP_DOMAIN, STEP_DOMAIN_VERSION, STEP_MAX,
                                       STEP_MEAN, STEP_MIN, VARIANT_FILES)
from stepnet.repository.names import (MODEL_NAME_RULE, VERSION_PATTERN, VERSION_RULE, is_version,
                                      parse_version, valid_model_name)
from stepnet.repository.states import VersionState

__all__ = ["INPUT", "METADATA_FILE", "METADATA_KEY", "MODEL_FILE", "MODEL_NAME_RULE", "OUTPUTS",
           "PARTIAL", "REPLACED", "STEP_DOMAIN", "STEP_DOMAIN_VERSION", "STEP_MAX", "STEP_MEAN",
           "STEP_MIN", "VARIANT_FILES", "VERSION_PATTERN", "VERSION_RULE", "VersionState", "is_version",
           "parse_version", "valid_model_name"]
