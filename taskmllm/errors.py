"""Typed errors raised by taskmllm.

Every error a user can trigger with bad input derives from :class:`TaskMLLMError`, so callers can catch
the project's errors without catching programming bugs. Each subclass names the problem in its message.
"""

from __future__ import annotations


class TaskMLLMError(Exception):
    """Base class of every error taskmllm raises on purpose."""


class ConfigError(TaskMLLMError, ValueError):
    """A configuration is malformed: an unknown key, a wrong type, an impossible value."""


class InputError(TaskMLLMError, ValueError):
    """User input (image, video, prompt) cannot be used."""


class ImageError(InputError):
    """An image is corrupt, empty, of zero size or of an unsupported type."""


class VideoError(InputError):
    """A video has zero frames or frames that do not agree."""


class PromptTooLongError(InputError):
    """The prompt with its visual tokens does not fit the language model's context."""


class BoxFormatError(InputError):
    """A ``<box>`` in text is malformed or has coordinates outside 0-999."""


class CheckpointError(TaskMLLMError):
    """A checkpoint directory cannot be loaded: missing file, wrong version, corrupt tensors."""

    def __init__(self, path: object, message: str) -> None:
        self.path = str(path)
        super().__init__(f"{self.path}: {message}")


class UnknownTaskError(TaskMLLMError, KeyError):
    """A task (expert) name is not registered."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


class RegistryError(TaskMLLMError):
    """An expert is registered twice, or a checkpoint's experts do not match the registry."""


class MetricInputError(TaskMLLMError, ValueError):
    """Inputs to an evaluation metric are malformed: mismatched lengths, wrong shapes, unknown labels."""


class TargetError(InputError):
    """Training targets do not fit an expert: another task's target, a missing field or a wrong shape."""


class DataFormatError(TaskMLLMError, ValueError):
    """An annotation file is malformed: a missing key, a box outside its image, an unknown id.

    ``source`` is the file, ``entry`` the offending entry (e.g. ``annotations[3] (id=17)`` or ``line 5``).
    A loader that raises it after reading a whole file attaches every entry's error in ``errors`` and what
    it could load in ``partial``, so valid entries are not lost.
    """

    def __init__(self, source: object, entry: object, message: str, *, errors: tuple = (),
                 partial: object = None) -> None:
        self.source = str(source)
        self.entry = str(entry)
        self.reason = message
        self.errors = tuple(errors)
        self.partial = partial
        super().__init__(f"{self.source}: {self.entry}: {message}")


class MissingPackageError(TaskMLLMError, ImportError):
    """An optional package that a feature needs is not installed; the message has the install command.

    ``package`` is the distribution name to install.
    """

    def __init__(self, package: str, message: str) -> None:
        self.package = package
        super().__init__(message)


class StaleCalibrationWarning(UserWarning):
    """An ``interventions.json`` entry was calibrated on other weights than the model's, so it is not used (the
    intervention runs its defaults until ``taskmllm calibrate`` is run for this model)."""
