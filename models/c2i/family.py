"""The class-conditional ImageNet family (`model.kind=c2i`): `ClassConditionalBitDance`, B/L/H at P = 1, 4, 16."""

from models.c2i.model import C2I_CONFIGS, get_c2i_config
from models.c2i.presets import PRESETS, recognise_c2i_checkpoint
from models.family import ModelFamily

FAMILY = ModelFamily(
    kind="c2i",
    config_names=", ".join(sorted(C2I_CONFIGS)) + " with an optional -1x/-4x/-16x",
    get_config=get_c2i_config,
    task="training.tasks.c2i:C2ITask",
    fp8_prefixes=("layers.",),  # the transformer blocks
    presets=PRESETS,
    recognise=recognise_c2i_checkpoint,
    generator="models.c2i.generation:C2IGenerator",
)
