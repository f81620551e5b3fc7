"""The one exception tree of GastroLens.

::

    GastroLensError
     ├── ConfigError            bad settings: names the file, key and reason
     ├── StorageError           the store could not persist bytes (disk, permissions)
     ├── InvalidInstanceError   received bytes that are not a storable instance
     ├── DatabaseError          the database could not commit
     ├── ModelError             networks, model packages, inference input
     │    └── ModelPackageError a package is missing, tampered or does not match
     ├── DeviceError            the accelerator is in a failed state: restart the engine, not per image
     ├── OutputError            a SEG / SR / overlay could not be written
     ├── DecodeError            a stored instance's pixel data could not be decoded
     └── DatasetError           a training manifest row is wrong (names the row)

Third-party errors are translated with ``raise ... from exc`` at the boundary.
"""

from __future__ import annotations


class GastroLensError(Exception):
    """Base of every error GastroLens raises on purpose."""


class ConfigError(GastroLensError):
    """A setting is wrong. ``str()`` names the file, the key and the reason."""

    def __init__(self, source: str, key: str, reason: str) -> None:
        self.source = source
        self.key = key
        self.reason = reason
        super().__init__(f"{source}: {key}: {reason}")


class StorageError(GastroLensError):
    """Bytes could not be persisted."""


class InvalidInstanceError(GastroLensError):
    """Received bytes are not a storable instance.

    ``status`` is the DICOM failure status the peer should get.
    """

    def __init__(self, reason: str, status: int) -> None:
        self.reason = reason
        self.status = status
        super().__init__(reason)


class DatabaseError(GastroLensError):
    """The database could not commit."""


class ModelError(GastroLensError):
    """Networks, model packages or inference input are wrong."""


class DeviceError(GastroLensError):
    """The accelerator failed in a way that sticks (a CUDA error poisons the context).

    Not a :class:`ModelError`: no image is at fault, so none may be failed for it. The
    worker stops claiming, hands its claims back and starts a fresh engine.
    """


class ModelPackageError(ModelError):
    """A model package is missing a file, was tampered with, or does not match."""


class OutputError(GastroLensError):
    """A result object could not be written."""


class DecodeError(GastroLensError):
    """A stored instance's pixel data is missing or could not be decoded to RGB."""


class DatasetError(GastroLensError):
    """A training manifest is wrong; the message names the row."""
