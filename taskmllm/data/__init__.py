"""taskmllm.data: the one sample type, real-format loaders, mixed datasets, POPE/CHAIR ground truth, media files
and previews — and, as one data source among others, ShapesWorld (:mod:`taskmllm.data.shapesworld`).
"""

from taskmllm.data.annotations import LoadResult
from taskmllm.data.chair import chair_counts, chair_ground_truth
from taskmllm.data.dataset import MixedDataset, SampleSource, SourceSpec, collate_samples
from taskmllm.data.coco import load_refs
from taskmllm.data.formats import load_coco, load_llava, load_mot, load_refcoco
from taskmllm.data.grounded import GroundedBuilder, GroundedOptions
from taskmllm.data.templates import load_templates
from taskmllm.data.pope import POPE_SPLITS, CooccurrenceStats, pope_samples
from taskmllm.data.preview import render_preview
from taskmllm.data.sample import Grounding, ObjectGT, Sample
from taskmllm.data.sources import SOURCE_KINDS, build_dataset, parse_sources

__all__ = [
    "LoadResult", "chair_counts", "chair_ground_truth", "MixedDataset", "SampleSource", "SourceSpec",
    "collate_samples", "load_coco", "load_llava", "load_mot", "load_refcoco", "POPE_SPLITS", "CooccurrenceStats",
    "pope_samples", "render_preview", "Grounding", "ObjectGT", "Sample", "SOURCE_KINDS", "build_dataset",
    "parse_sources", "load_refs", "GroundedBuilder", "GroundedOptions", "load_templates",
]
