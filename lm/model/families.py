"""The encoder-only (BERT-style) and encoder-decoder (T5-style) families.

Both reuse the decoder's blocks: an encoder block is a block with `causal=False`; a
T5 decoder block adds cross-attention to the encoder's output.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from lm.model.config import ModelConfig
from lm.model.layers import ACTIVATIONS, Dense, Embed, norm
from lm.model.transformer import default_positions, embed_inputs, output_logits, run_blocks

Array = jax.Array


class Encoder(nn.Module):
    """Bidirectional encoder with BERT's masked-LM head (dense, GELU, norm, tied output + bias).

    Same call as `Decoder`; `prefix_BL` is ignored (every token sees every token of its
    document).
    """

    cfg: ModelConfig

    @nn.compact
    def __call__(self, tokens_BL: Array, positions_BL: Array | None = None, segment_ids_BL: Array | None = None,
                 deterministic: bool = True, prefix_BL: Array | None = None) -> Array:
        c = self.cfg
        positions_BL = default_positions(tokens_BL) if positions_BL is None else positions_BL
        embed = Embed(c.vocab_size, c.d_model, c.init_std, c.compute_dtype, name="embed")
        x_BLD = embed_inputs(self, embed, tokens_BL, positions_BL, deterministic)
        x_BLD = run_blocks(c, deterministic, x_BLD, positions_BL, segment_ids_BL, None, causal=False)
        x_BLD = norm(c.norm, c.norm_eps, c.use_bias, c.compute_dtype, "final_norm")(x_BLD)
        h_BLD = Dense((c.d_model,), ("embed", "mlp"), init_std=c.hidden_init_std, use_bias=True,
                      dtype=c.compute_dtype, name="mlm_dense")(x_BLD)
        h_BLD = norm(c.norm, c.norm_eps, c.use_bias, c.compute_dtype, "mlm_norm")(ACTIVATIONS["gelu"](h_BLD))
        bias_V = self.param("mlm_bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), ("vocab",)),
                            (c.vocab_size,))
        return output_logits(c, embed, h_BLD) + bias_V


class EncoderDecoder(nn.Module):
    """T5-style: a bidirectional encoder over the inputs and a causal decoder with
    cross-attention, sharing one embedding (tied to the output)."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, inputs_BS: Array | None, decoder_inputs_BL: Array, deterministic: bool = True,
                 input_segment_ids_BS: Array | None = None, decode: bool = False,
                 decoder_positions_BL: Array | None = None) -> Array:
        """Logits [B, L, V] of the decoder's tokens. With `decode` (lm.inference.decode), the decoder
        extends a KV cache in the mutable "cache" collection: the first call passes the
        inputs (the encoder runs once and its keys and values are cached per layer); later
        calls pass `inputs_BS=None` and each new token's `decoder_positions_BL`."""
        c = self.cfg
        embed = Embed(c.vocab_size, c.d_model, c.init_std, c.compute_dtype, name="embed")
        memory_BSD = memory_mask_B1LS = None
        if inputs_BS is not None:
            input_positions_BS = default_positions(inputs_BS)
            x_BSD = embed_inputs(self, embed, inputs_BS, input_positions_BS, deterministic, "encoder_pos_embed")
            x_BSD = run_blocks(c, deterministic, x_BSD, input_positions_BS, input_segment_ids_BS, None,
                               causal=False, name="encoder_layer")
            memory_BSD = norm(c.norm, c.norm_eps, c.use_bias, c.compute_dtype, "encoder_norm")(x_BSD)
            if input_segment_ids_BS is not None:  # decoder queries never read encoder padding
                memory_mask_B1LS = jnp.broadcast_to(
                    (input_segment_ids_BS > 0)[:, None, None, :],
                    (inputs_BS.shape[0], 1, decoder_inputs_BL.shape[1], inputs_BS.shape[1]))
        positions_BL = default_positions(decoder_inputs_BL) if decoder_positions_BL is None else decoder_positions_BL
        y_BLD = embed_inputs(self, embed, decoder_inputs_BL, positions_BL, deterministic, "decoder_pos_embed")
        y_BLD = run_blocks(c, deterministic, y_BLD, positions_BL, None, None, memory_BSD, memory_mask_B1LS,
                           cross=True, num_layers=c.num_decoder_layers or c.num_layers, name="decoder_layer",
                           decode=decode)
        y_BLD = norm(c.norm, c.norm_eps, c.use_bias, c.compute_dtype, "decoder_norm")(y_BLD)
        # No d_model^-1/2 rescaling before the tied output, unlike T5: T5 initialises its
        # embedding with std 1; ours has init_std (0.02), like GPT-2's tied output.
        return output_logits(c, embed, y_BLD)
