"""fusestore: prioritized pooling of image datadirs behind one FUSE mount."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("fusestore")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0+unknown"
