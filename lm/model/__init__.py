"""Model families and their construction from config."""

import flax.linen as nn

from lm.model.config import ModelConfig
from lm.model.families import Encoder, EncoderDecoder
from lm.model.transformer import Decoder

FAMILIES = {"decoder": Decoder, "encoder": Encoder, "encoder_decoder": EncoderDecoder}


def build(cfg: ModelConfig) -> nn.Module:
    """The Flax module of `cfg.family`."""
    return FAMILIES[cfg.family](cfg)


__all__ = ["ModelConfig", "Decoder", "Encoder", "EncoderDecoder", "FAMILIES", "build"]
