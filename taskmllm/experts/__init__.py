"""Expert heads and their registry.

``EXPERTS`` maps a task name (the task token without brackets) to its :class:`Expert` class. It is an
explicit dict: adding an expert is one file and one line here, or :func:`register_expert` at run time on a
registry the caller owns (tests pass a copy).
"""

from __future__ import annotations

from typing import Mapping, MutableMapping, Optional

from taskmllm.errors import ConfigError, RegistryError, UnknownTaskError
from taskmllm.experts.base import (
    Expert,
    ExpertOptions,
    ExpertPrompt,
    ExpertSpec,
    TaskTarget,
    VisionFeatures,
)
from taskmllm.experts.detection import DetectionExpert, DetectionOptions, DetectionOutput, DetectionResult
from taskmllm.experts.segmentation import (
    SegmentationExpert,
    SegmentationOptions,
    SegmentationOutput,
    SegmentationResult,
)
from taskmllm.experts.tracking import TrackingExpert, TrackingOptions, TrackingOutput, TrackResult

EXPERTS: dict[str, type[Expert]] = {
    "seg": SegmentationExpert,
    "det": DetectionExpert,
    "track": TrackingExpert,
}


def get_expert_class(name: str, registry: Optional[Mapping[str, type[Expert]]] = None) -> type[Expert]:
    """The class registered under ``name``; :class:`UnknownTaskError` lists the valid names."""
    registry = EXPERTS if registry is None else registry
    if name not in registry:
        raise UnknownTaskError(f"unknown task {name!r}; registered experts: {', '.join(sorted(registry)) or '(none)'}")
    return registry[name]


def build_expert(name: str, spec: ExpertSpec, registry: Optional[Mapping[str, type[Expert]]] = None) -> Expert:
    """Instantiate the expert registered under ``name`` from ``spec``."""
    cls = get_expert_class(name, registry)
    if not isinstance(spec, ExpertSpec):
        raise ConfigError(f"build_expert({name!r}) needs an ExpertSpec, got {type(spec).__name__}")
    return cls(spec)


def default_spec(
    name: str,
    hidden_size: int,
    vision_dim: int,
    grid: tuple[int, int],
    image_size: int,
    num_queries: Optional[int] = None,
    registry: Optional[Mapping[str, type[Expert]]] = None,
    **options: object,
) -> ExpertSpec:
    """An :class:`ExpertSpec` with the expert's default number of queries unless given."""
    cls = get_expert_class(name, registry)
    k = cls.default_num_queries if num_queries is None else num_queries
    return ExpertSpec(hidden_size, vision_dim, tuple(grid), image_size, k, dict(options))  # type: ignore[arg-type]


def register_expert(
    name: str, cls: type[Expert], registry: Optional[MutableMapping[str, type[Expert]]] = None
) -> None:
    """Add ``cls`` under ``name`` to ``registry`` (default: the global :data:`EXPERTS`).

    Raises :class:`RegistryError` when the name is taken, not a plain identifier, or ``cls`` is not an
    :class:`Expert` whose ``name`` attribute equals ``name``.
    """
    registry = EXPERTS if registry is None else registry
    if not isinstance(name, str) or not name.isidentifier():
        raise RegistryError(f"expert name must be an identifier such as 'seg', got {name!r}")
    if name in registry:
        raise RegistryError(f"an expert is already registered as {name!r} ({registry[name].__name__})")
    if not (isinstance(cls, type) and issubclass(cls, Expert)):
        raise RegistryError(f"{cls!r} is not a subclass of taskmllm.experts.Expert")
    if cls.name != name:
        raise RegistryError(f"{cls.__name__}.name is {cls.name!r}, but it is being registered as {name!r}")
    registry[name] = cls


__all__ = [
    "EXPERTS",
    "DetectionExpert",
    "DetectionOptions",
    "DetectionOutput",
    "DetectionResult",
    "Expert",
    "ExpertOptions",
    "ExpertPrompt",
    "ExpertSpec",
    "SegmentationExpert",
    "SegmentationOptions",
    "SegmentationOutput",
    "SegmentationResult",
    "TaskTarget",
    "TrackResult",
    "TrackingExpert",
    "TrackingOptions",
    "TrackingOutput",
    "VisionFeatures",
    "build_expert",
    "default_spec",
    "get_expert_class",
    "register_expert",
]
