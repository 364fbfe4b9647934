"""taskmllm.data: ShapesWorld (synthetic images/videos with exact ground truth), conversations in the token
protocol with expert targets, POPE/CHAIR ground truth, real-format loaders, mixed datasets and previews.
"""

from taskmllm.data.chair import CHAIR_SYNONYMS, chair_counts, chair_ground_truth, mentioned_objects
from taskmllm.data.conversations import (IMAGE_TASKS, VIDEO_TASKS, ConversationBuilder, ConversationConfig,
                                         corpus)
from taskmllm.data.dataset import (DEFAULT_MIX, MixedDataset, ShapesWorldSource, collate_samples,
                                   shapesworld_dataset)
from taskmllm.data.formats import LoadResult, load_coco, load_llava, load_mot, load_refcoco
from taskmllm.data.pope import POPE_SPLITS, CooccurrenceStats, pope_samples, pope_split
from taskmllm.data.preview import preview_main, render_preview
from taskmllm.data.sample import ObjectGT, Sample
from taskmllm.data.shapesworld import SPLITS, ShapesWorld, WorldConfig

__all__ = [
    "CHAIR_SYNONYMS", "chair_counts", "chair_ground_truth", "mentioned_objects", "IMAGE_TASKS", "VIDEO_TASKS",
    "ConversationBuilder", "ConversationConfig", "corpus", "DEFAULT_MIX", "MixedDataset", "ShapesWorldSource",
    "collate_samples", "shapesworld_dataset", "LoadResult", "load_coco", "load_llava", "load_mot",
    "load_refcoco", "POPE_SPLITS", "CooccurrenceStats", "pope_samples", "pope_split", "preview_main",
    "render_preview", "ObjectGT", "Sample", "SPLITS", "ShapesWorld", "WorldConfig",
]
