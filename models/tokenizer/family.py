"""The binary tokenizer family (`model.kind=tokenizer`): the sign-quantizing convolutional autoencoder."""

from models.family import ModelFamily
from models.tokenizer.model import TOKENIZER_CONFIGS, get_tokenizer_config

FAMILY = ModelFamily(
    kind="tokenizer",
    config_names=", ".join(sorted(TOKENIZER_CONFIGS)),
    get_config=get_tokenizer_config,
    task="training.tasks.tokenizer:TokenizerTask",
)
