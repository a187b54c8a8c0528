"""gendd-pipe: an offline teacher-feature cache and GenDD distillation for vision models."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("gendd-pipe")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0"

from gendd_pipe.errors import GenddError
from gendd_pipe.store.reader import FeatureStore

__all__ = ["FeatureStore", "GenddError", "__version__"]
