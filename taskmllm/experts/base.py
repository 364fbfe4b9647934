"""Types shared by every expert: its inputs (vision features, prompts) and its training targets.

The data engine produces :class:`TaskTarget` objects aligned with the task tokens of an answer; the router
hands each expert the query hidden states of its calls together with :class:`VisionFeatures` and
:class:`ExpertPrompt` objects. This module imports nothing from the rest of taskmllm but ``errors``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

from taskmllm.errors import ConfigError, TargetError
from taskmllm.experts.canvas import Canvas, Color
from taskmllm.schema import from_dict

ArrayLike = Union[np.ndarray, torch.Tensor]


@dataclass
class VisionFeatures:
    """Per-call visual features handed to an expert.

    Attributes:
        features: ``(M, T, N, C)`` — M calls, T frames (1 for an image), N = h*w patch tokens in row-major
            order, C the vision tower's width.
        grid: ``(h, w)`` of the patch grid.
        image_size: side of the square image the model saw, in pixels.
        context: ``(M, T, N', H)`` the LLM's last-layer hidden states at the visual tokens of each call's frames
            (the tokens follow the question, so they can say where what it names is), or None. Read by experts
            with ``llm_context``.
        context_grid: ``(h', w')`` grid of those tokens (the projector pools the patch grid).
        pixels: ``(M, T, 3, S, S)`` the frames as the tower saw them (normalized), or None. Read by experts that
            refine their output at a finer stride than the patch grid (segmentation's ``detail``).
    """

    features: torch.Tensor
    grid: tuple[int, int]
    image_size: int
    context: Optional[torch.Tensor] = None
    context_grid: Optional[tuple[int, int]] = None
    pixels: Optional[torch.Tensor] = None

    def frame_context(self, single_frame: bool) -> Optional[torch.Tensor]:
        """``context`` of the first frame ``(M, N', H)`` (``single_frame``) or of every frame, or None."""
        if self.context is None:
            return None
        return self.context[:, 0] if single_frame else self.context


@dataclass
class ExpertPrompt:
    """What the transcript says about one call besides its query states.

    Attributes:
        phrase: the ``<ref>`` phrase that names the target, if any.
        box: ``(4,)`` normalized ``x1, y1, x2, y2`` given in the prompt (e.g. a tracking target), if any.
    """

    phrase: Optional[str] = None
    box: Optional[ArrayLike] = None


@dataclass
class TaskTarget:
    """Ground truth for one task token in an answer (numpy or torch arrays).

    Attributes:
        task: expert name (``"seg"``, ``"det"``, ``"track"``).
        phrase: the ``<ref>`` phrase in the answer, if any.
        mask: ``(H, W)`` bool instance mask at the source image's resolution (segmentation).
        boxes: normalized ``x1, y1, x2, y2``: ``(M, 4)`` all target boxes (detection, M may be 0) or
            ``(T, 4)`` one box per frame (tracking; rows of invisible frames are ignored).
        visible: ``(T,)`` bool per-frame visibility (tracking).
        prompt_box: ``(4,)`` normalized box given in the prompt (tracking from a box), if any.
    """

    task: str
    phrase: Optional[str] = None
    mask: Optional[ArrayLike] = None
    boxes: Optional[ArrayLike] = None
    visible: Optional[ArrayLike] = None
    prompt_box: Optional[ArrayLike] = None


class ExpertResult(ABC):
    """One call's user-facing output at the original image size (numpy, pixels). Each expert's result type
    subclasses it and says how it is drawn and serialized, so nothing above the experts knows a task by name."""

    @abstractmethod
    def draw(self, canvas: Canvas, frame: Optional[int], label: str, color: Color, threshold: float) -> None:
        """Annotate ``canvas``: the image (``frame`` None) or frame ``frame`` of a video. ``label`` names the call
        (its ``<ref>`` phrase or task); outputs scored below ``threshold`` are left out."""

    @abstractmethod
    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields of the output (lists, strings, numbers)."""


# --------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------

JsonScalar = Union[int, float, str, bool, None]


#: Upper bounds of an :class:`ExpertSpec`'s sizes (far above any real model; nothing allocates from a typo).
SPEC_LIMITS = {"hidden_size": 2**16, "vision_dim": 2**15, "image_size": 4096, "num_queries": 256, "grid": 4096}


@dataclass
class ExpertSpec:
    """What an expert is built from; stored as ``experts/<name>/config.json`` beside its safetensors.

    Attributes:
        hidden_size: H, the LLM hidden size of the query states the expert receives.
        vision_dim: C, the width of the vision features (before the MLLM's projector).
        grid: ``(h, w)`` patch grid the vision tower produces at ``image_size``. The experts compute their
            positional encodings from the grid of the features they are given, so another grid works too.
        image_size: side of the square model input in pixels (losses on masks are computed at this size).
        num_queries: K, query states per call. The MLLM must insert exactly K query embeddings after the
            expert's task token.
        options: expert-specific options (widths, depths, loss weights), JSON scalars only; each expert
            parses them into its own typed ``Options`` dataclass and rejects unknown keys.
    """

    hidden_size: int
    vision_dim: int
    grid: tuple[int, int]
    image_size: int
    num_queries: int
    options: dict[str, JsonScalar] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.grid, (tuple, list)):
            raise ConfigError(f"ExpertSpec.grid must be (h, w), got {self.grid!r}")
        if len(self.grid) == 2 and all(isinstance(v, int) and not isinstance(v, bool) for v in self.grid):
            self.grid = (int(self.grid[0]), int(self.grid[1]))
        else:
            raise ConfigError(f"ExpertSpec.grid must be (h, w) ints, got {self.grid!r}")
        for key in ("hidden_size", "vision_dim", "image_size", "num_queries"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= SPEC_LIMITS[key]:
                raise ConfigError(f"ExpertSpec.{key} must be an int in [1, {SPEC_LIMITS[key]}], got {value!r}")
        if not all(0 < side <= SPEC_LIMITS["grid"] for side in self.grid):
            raise ConfigError(f"ExpertSpec.grid must be (h, w) with sides in [1, {SPEC_LIMITS['grid']}], "
                              f"got {self.grid!r}")
        if not isinstance(self.options, dict):
            raise ConfigError(f"ExpertSpec.options must be a dict, got {type(self.options).__name__}")
        for key, value in self.options.items():
            if not isinstance(key, str) or not isinstance(value, (int, float, str, bool, type(None))):
                raise ConfigError(f"ExpertSpec.options[{key!r}] must be a JSON scalar, got {value!r}")

    def to_dict(self) -> dict[str, object]:
        """A JSON-serialisable dict (``grid`` as a list)."""
        return {
            "hidden_size": self.hidden_size,
            "vision_dim": self.vision_dim,
            "grid": [self.grid[0], self.grid[1]],
            "image_size": self.image_size,
            "num_queries": self.num_queries,
            "options": dict(self.options),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> "ExpertSpec":
        """Inverse of :meth:`to_dict`; unknown or missing keys and wrong types raise :class:`ConfigError`."""
        return from_dict(cls, data, "ExpertSpec")


@dataclass
class ExpertOptions:
    """Base of each expert's typed options; built from ``ExpertSpec.options`` with strict key checking."""

    @classmethod
    def from_dict(cls, data: Mapping[str, JsonScalar]) -> "ExpertOptions":
        """Strictly typed options (:func:`taskmllm.schema.from_dict`): unknown keys and wrong types raise."""
        return from_dict(cls, data, cls.__name__)

    def to_dict(self) -> dict[str, JsonScalar]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass
class DecoderOptions(ExpertOptions):
    """Options every built-in expert shares: the width and depth of its attention decoder.

    Attributes:
        dim: decoder width; depth: layers; num_heads: attention heads; mlp_dim: MLP hidden width.
        llm_context: also read the LLM's hidden states at the visual tokens (``VisionFeatures.context``),
            projected to ``dim``, spread over the patches each token pools and added to the projected patch
            features. Those tokens come after the question, so with the recipe's focus loss they mark what it
            names: the phrase-to-patch lookup the expert otherwise has to learn from its own sparse loss.
        query_norm: ``none`` or ``batch``: standardize each dimension of the query states before the projection
            (:class:`~taskmllm.experts.common.QueryProjection`).
    """

    dim: int = 64
    depth: int = 2
    num_heads: int = 4
    mlp_dim: int = 256
    llm_context: bool = False
    query_norm: str = "none"


#: Upper bounds of a decoder's sizes (SAM's decoder: dim 256, depth 2, mlp_dim 2048).
DECODER_LIMITS = {"dim": 2048, "num_heads": 64, "depth": 16, "mlp_dim": 8192}


def check_widths(owner: str, dim: int, num_heads: int, depth: int, multiple: int, mlp_dim: int = 1) -> None:
    """Raise :class:`ConfigError` unless ``dim`` is a positive multiple of ``multiple`` and of ``num_heads`` times
    the attention downsampling (``multiple // 2`` in SAM's TwoWayTransformer cross-attention), and every size is
    within :data:`DECODER_LIMITS`."""
    sizes = {"dim": dim, "num_heads": num_heads, "depth": depth, "mlp_dim": mlp_dim}
    for key, value in sizes.items():
        if not 0 < value <= DECODER_LIMITS[key]:
            raise ConfigError(f"{owner}: {key} must be in [1, {DECODER_LIMITS[key]}], got {value}")
    if dim % multiple or dim % (2 * num_heads):
        raise ConfigError(f"{owner}: dim={dim} must be divisible by {multiple} and by 2 * num_heads={2 * num_heads}")


# --------------------------------------------------------------------------------------------------
# The expert protocol
# --------------------------------------------------------------------------------------------------


class Expert(nn.Module, ABC):
    """A differentiable task head driven by the LLM hidden states of K task queries.

    A subclass declares its registry name (the task token ``<name>``), default number of queries K, options
    class and whether it reads whole videos as class keywords —
    ``class SegmentationExpert(Expert, name="seg", num_queries=1, options=SegmentationOptions)`` — which set the
    class attributes below, and implements :meth:`forward`, :meth:`loss` and :meth:`postprocess`. Each expert owns
    its projection from the LLM hidden size H; the learnable query embeddings themselves belong to the MLLM.

    Calling convention (M calls, K queries, T frames, N = h*w patches, C vision width):
        ``forward(query_states (M, K, H), features: VisionFeatures (M, T, N, C), prompts: list[ExpertPrompt]
        of length M or None) -> <Name>Output``;
        ``loss(outputs, targets: list[TaskTarget] of length M) -> dict[str, Tensor]`` with the expert's
        own loss weights already applied (their sum is the expert's loss);
        ``postprocess(outputs, sizes: list[(H, W)] original image sizes) -> list[<Name>Result]`` (each an
        :class:`ExpertResult`, which draws and serializes itself).
    """

    name: ClassVar[str] = ""
    default_num_queries: ClassVar[int] = 1
    options_cls: ClassVar[type[ExpertOptions]] = ExpertOptions
    #: whether the expert reads every frame of a video (tracking); an image expert called about a video (a
    #: model may emit ``<det>`` for one) reads its first frame (``taskmllm.router.dispatch``)
    video: ClassVar[bool] = False

    def __init_subclass__(cls, name: Optional[str] = None, num_queries: Optional[int] = None,
                          options: Optional[type[ExpertOptions]] = None, video: Optional[bool] = None,
                          **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for attr, value in (("name", name), ("default_num_queries", num_queries), ("options_cls", options),
                            ("video", video)):
            if value is not None:
                setattr(cls, attr, value)

    @property
    def reads_pixels(self) -> bool:
        """Whether :meth:`forward` reads ``VisionFeatures.pixels`` (the caller stacks them only then)."""
        return False

    def __init__(self, spec: ExpertSpec) -> None:
        super().__init__()
        self.spec = spec
        self.options = self.options_cls.from_dict(spec.options)
        self.num_queries = spec.num_queries
        self.hidden_size = spec.hidden_size
        self.vision_dim = spec.vision_dim

    @abstractmethod
    def forward(self, query_states: torch.Tensor, features: VisionFeatures,
                prompts: Optional[Sequence[ExpertPrompt]] = None) -> object:
        """Run the head; see the class docstring."""

    @abstractmethod
    def loss(self, outputs: object, targets: Sequence[TaskTarget]) -> dict[str, torch.Tensor]:
        """Named, weighted loss terms (scalars) against the targets of the same calls."""

    @abstractmethod
    def postprocess(self, outputs: object, sizes: Sequence[tuple[int, int]],
                    score_threshold: Optional[float] = None) -> list[ExpertResult]:
        """User-facing results at each call's original ``(H, W)``.

        ``score_threshold``: for experts whose outputs carry scores (detection), the lowest score kept (None:
        the expert's own option); experts without scores ignore it.
        """

    # ---------------------------------------------------------------------------------------------
    # Shared checks
    # ---------------------------------------------------------------------------------------------

    def check_inputs(
        self,
        query_states: torch.Tensor,
        features: VisionFeatures,
        prompts: Optional[Sequence[ExpertPrompt]],
        single_frame: bool,
    ) -> None:
        """Raise :class:`ConfigError` when the inputs do not fit this expert's spec."""
        if query_states.dim() != 3:
            raise ConfigError(f"{self.name}: query_states must be (M, K, H), got {tuple(query_states.shape)}")
        m, k, h = query_states.shape
        if k != self.num_queries:
            raise ConfigError(
                f"{self.name}: expected {self.num_queries} query states per call (num_queries), got {k}"
            )
        if h != self.hidden_size:
            raise ConfigError(f"{self.name}: query states have hidden size {h}, expert expects {self.hidden_size}")
        x = features.features
        if x.dim() != 4:
            raise ConfigError(f"{self.name}: vision features must be (M, T, N, C), got {tuple(x.shape)}")
        if x.shape[0] != m:
            raise ConfigError(f"{self.name}: {m} query calls but vision features for {x.shape[0]} calls")
        gh, gw = features.grid
        if x.shape[2] != gh * gw:
            raise ConfigError(f"{self.name}: features have N={x.shape[2]} tokens, grid {gh}x{gw} needs {gh * gw}")
        if x.shape[3] != self.vision_dim:
            raise ConfigError(f"{self.name}: features have width C={x.shape[3]}, expert expects {self.vision_dim}")
        if single_frame and x.shape[1] != 1:
            raise ConfigError(f"{self.name}: expects single-frame features (T=1), got T={x.shape[1]}")
        if x.shape[1] < 1:
            raise ConfigError(f"{self.name}: features have zero frames")
        if prompts is not None and len(prompts) != m:
            raise ConfigError(f"{self.name}: {m} calls but {len(prompts)} prompts")

    def check_targets(self, targets: Sequence[TaskTarget], num_calls: int) -> None:
        """Raise :class:`TargetError` for a wrong count or another task's targets."""
        if len(targets) != num_calls:
            raise TargetError(f"{self.name}: {num_calls} outputs but {len(targets)} targets")
        for i, target in enumerate(targets):
            if not isinstance(target, TaskTarget):
                raise TargetError(f"{self.name}: target {i} is a {type(target).__name__}, not a TaskTarget")
            if target.task != self.name:
                raise TargetError(f"{self.name}: target {i} is for task {target.task!r}, not {self.name!r}")


def zero_terms(names: Sequence[str], reference: torch.Tensor) -> dict[str, torch.Tensor]:
    """Zero loss terms still attached to ``reference``'s graph (for a batch with no calls of this task)."""
    zero = reference.float().sum() * 0.0
    return {name: zero for name in names}


def as_tensor(value: ArrayLike, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A numpy array or tensor as a tensor of ``dtype`` on ``device`` (no copy when it already is)."""
    if isinstance(value, np.ndarray):
        value = torch.from_numpy(np.ascontiguousarray(value))
    if not isinstance(value, torch.Tensor):
        value = torch.as_tensor(value)
    return value.to(device=device, dtype=dtype)
