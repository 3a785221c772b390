"""The states a model version goes through in a serving process."""

from enum import Enum


class VersionState(str, Enum):
    LOADING = "loading"        # being read, verified and warmed
    READY = "ready"            # serving
    FAILED = "failed"          # refused: its reason says why
    UNLOADING = "unloading"    # retired; requests that hold it finish first
    UNLOADED = "unloaded"      # not in memory (never tried, retired, or unloaded by an admin)

    @property
    def listed(self) -> bool:
        """Known to requests: a model whose versions are all unloaded(ing) is not served."""
        return self in (VersionState.LOADING, VersionState.READY, VersionState.FAILED)
