"""ShapesWorld: the embedded synthetic data source — images and videos of shapes with exact ground truth.

Everything ShapesWorld-specific lives in this package: the scene generator (:mod:`.world`), its closed
vocabulary (:mod:`.vocab`), referring expressions (:mod:`.referring`), the conversation builder in the token
protocol (:mod:`.conversations`), the data source a stage names (``kind: shapesworld``, :mod:`.source`) and the
preview grid. The general core knows it only as one kind of data source.
"""

from taskmllm.data.shapesworld.conversations import (DIALOG_TASKS, IMAGE_TASKS, QA_TASKS, VIDEO_TASKS,
                                                     ConversationBuilder, ConversationConfig, corpus)
from taskmllm.data.shapesworld.source import (ALL_TASKS, DEFAULT_MIX, ShapesWorldSpec, TaskSource,
                                              shapesworld_dataset)
from taskmllm.data.shapesworld.vocab import CHAIR_SYNONYMS, COLORS, SHAPES, SIZES, mentioned_objects
from taskmllm.data.shapesworld.world import SPLITS, Shape, ShapesWorld, WorldConfig

__all__ = ["ALL_TASKS", "CHAIR_SYNONYMS", "COLORS", "ConversationBuilder", "ConversationConfig", "DEFAULT_MIX",
           "DIALOG_TASKS", "IMAGE_TASKS", "QA_TASKS", "SHAPES", "SIZES", "SPLITS", "Shape", "ShapesWorld",
           "ShapesWorldSpec", "TaskSource", "VIDEO_TASKS", "WorldConfig", "corpus", "mentioned_objects",
           "shapesworld_dataset"]
