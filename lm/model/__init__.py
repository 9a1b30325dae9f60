"""Model families and their construction from config."""

from lm.model.config import ModelConfig
from lm.model.transformer import Decoder


def build(cfg: ModelConfig) -> Decoder:
    """The Flax module for `cfg` (the decoder family; more families arrive with issue 4)."""
    return Decoder(cfg)


__all__ = ["ModelConfig", "Decoder", "build"]
