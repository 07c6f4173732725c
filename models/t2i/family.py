"""The text-to-image family (`model.kind=t2i`): Qwen3 backbone + binary diffusion head (`TextToImageBitDance`)."""

from models.family import ModelFamily
from models.t2i.model import get_t2i_config
from models.t2i.presets import PRESETS, recognise_t2i_folder

FAMILY = ModelFamily(
    kind="t2i",
    config_names="14B-16x, 14B-64x, tiny-<P>x, demo-<P>x",
    get_config=get_t2i_config,
    task="training.tasks.t2i:T2ITask",
    fp8_prefixes=("llm.model.layers.",),  # the Qwen3 blocks
    presets=PRESETS,
    recognise=recognise_t2i_folder,
    generator="models.t2i.generation:T2IGenerator",
)
