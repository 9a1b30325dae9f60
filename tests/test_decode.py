"""KV-cache decoding: equal to recomputing the whole forward pass at every step, for
batched prompts of different lengths; greedy, top-k, top-p, sampling and beam search."""

import dataclasses
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import REPO, cli_flags, run_cli

from lm.inference import decode, slots
from lm.inference.beam import beam_search, beam_search_encoder_decoder
from lm.inference.sampling import Sampling, process_logits
from lm.model import ModelConfig, build

VOCAB = 50
VARIANTS = {
    "rope_gqa": dict(positions="rope", num_kv_heads=2, norm="rmsnorm", activation="swiglu"),
    "learned_bias": dict(positions="learned", use_bias=True, activation="gelu_tanh"),
    "rope_scanned": dict(positions="rope", scan_layers=True),
}


def tiny_model(**options):
    cfg = ModelConfig(vocab_size=VOCAB, max_len=32, num_layers=2, num_heads=4, d_model=32, head_dim=8, d_ff=64,
                      **options)
    model = build(cfg)
    tokens = (jnp.zeros((1, 8), jnp.int32),) * (2 if cfg.family == "encoder_decoder" else 1)
    params = nn.meta.unbox(model.init(jax.random.key(0), *tokens)["params"])
    # Larger weights than the init's, so next-token distributions are far from uniform.
    params = jax.tree.map(lambda p: p * 4 if p.ndim >= 2 else p, params)
    return model, params


PROMPTS = [np.array([5, 9, 3, 7, 11, 2, 8]), np.array([4, 4]), np.array([13, 21, 34, 8, 1])]


@pytest.mark.parametrize("variant", ["rope_gqa", pytest.param("learned_bias", marks=pytest.mark.decode),
                                     pytest.param("rope_scanned", marks=pytest.mark.decode)])
def test_cached_decoding_equals_recomputing_the_forward_pass_at_every_step(variant):
    model, params = tiny_model(**VARIANTS[variant])
    tokens_BP, valid_BP, positions_BP = decode.left_pad(PROMPTS, pad_id=0)
    new_BT, logits_BTV = decode.generate_cached(model, params, tokens_BP, valid_BP, positions_BP, jax.random.key(0),
                                                max_new_tokens=10, sampling=Sampling(temperature=0.0))
    # Each row recomputed alone, from its first token (right padding cannot reach back
    # through a causal mask), in one jitted forward pass.
    sequences = [np.concatenate([prompt, np.asarray(new_BT[row])]) for row, prompt in enumerate(PROMPTS)]
    padded_BL = np.zeros((len(sequences), max(map(len, sequences))), np.int32)
    for row, sequence in enumerate(sequences):
        padded_BL[row, :len(sequence)] = sequence
    full_BLV = jax.jit(model.apply)({"params": params}, jnp.asarray(padded_BL))
    for row, prompt in enumerate(PROMPTS):
        recomputed_TV = full_BLV[row, len(prompt) - 1:len(sequences[row]) - 1]
        np.testing.assert_allclose(logits_BTV[row], recomputed_TV, atol=1e-5, rtol=0)
        np.testing.assert_array_equal(new_BT[row], np.argmax(recomputed_TV, axis=-1))


@pytest.mark.decode
def test_beam_one_and_top_k_one_are_greedy_and_seeded_sampling_repeats():
    model, params = tiny_model(**VARIANTS["rope_gqa"])
    prompt = PROMPTS[0]
    greedy = decode.generate_batch(model, params, [prompt], 0, max_new_tokens=12,
                                   sampling=Sampling(temperature=0.0))[0]
    beam, _ = beam_search(model, params, jnp.asarray(prompt), beam_size=1, max_new_tokens=12)
    np.testing.assert_array_equal(beam[0], greedy)
    top_1 = decode.generate_batch(model, params, [prompt], 0, max_new_tokens=12,
                                  sampling=Sampling(temperature=1.5, top_k=1), seed=3)[0]
    np.testing.assert_array_equal(top_1, greedy)
    tiny_nucleus = decode.generate_batch(model, params, [prompt], 0, max_new_tokens=12,
                                         sampling=Sampling(temperature=1.0, top_p=1e-6), seed=3)[0]
    np.testing.assert_array_equal(tiny_nucleus, greedy)

    sample = lambda seed: decode.generate_batch(model, params, PROMPTS, 0, max_new_tokens=12,
                                                sampling=Sampling(temperature=1.0), seed=seed)
    np.testing.assert_array_equal(sample(7), sample(7))
    assert not np.array_equal(sample(7), sample(8))


def test_decoding_past_the_context_refills_the_cache_with_its_last_half_and_numbers_draws_across_refills():
    model, params = tiny_model(**VARIANTS["rope_gqa"])  # a context of 32 tokens
    prompt, greedy = PROMPTS[0], Sampling(temperature=0.0)  # 7 tokens: 25 new ones fill the cache
    long = decode.generate_windowed(model, params, prompt, 0, max_new_tokens=40, window=32, sampling=greedy)
    first = decode.generate_batch(model, params, [prompt], 0, max_new_tokens=25, sampling=greedy)[0]
    after = decode.generate_batch(model, params, [np.concatenate([prompt, first])[-16:]], 0, max_new_tokens=15,
                                  sampling=greedy)[0]
    np.testing.assert_array_equal(long, np.concatenate([first, after]))
    warm = Sampling(temperature=1.0)
    drawn = decode.generate_windowed(model, params, prompt, 0, max_new_tokens=40, window=32, sampling=warm, seed=4)
    fits = decode.generate_batch(model, params, [prompt], 0, max_new_tokens=25, sampling=warm, seed=4)[0]
    np.testing.assert_array_equal(drawn[:25], fits)


@pytest.mark.decode
def test_beam_search_finds_a_sequence_at_least_as_likely_as_greedy():
    model, params = tiny_model(**VARIANTS["learned_bias"])
    prompt = jnp.asarray(PROMPTS[2])

    def log_likelihood(continuation):
        sequence = jnp.concatenate([prompt, jnp.asarray(continuation)])
        log_p = jax.nn.log_softmax(model.apply({"params": params}, sequence[None, :-1])[0], -1)
        return float(sum(log_p[t - 1, sequence[t]] for t in range(len(prompt), len(sequence))))

    greedy = decode.generate_batch(model, params, [np.asarray(prompt)], 0, max_new_tokens=6,
                                   sampling=Sampling(temperature=0.0))[0]
    beams, scores = beam_search(model, params, prompt, beam_size=4, max_new_tokens=6)
    assert log_likelihood(beams[0]) >= log_likelihood(greedy) - 1e-5
    assert float(scores[0]) == pytest.approx(log_likelihood(beams[0]), abs=1e-4)  # no penalty, no <eos>
    assert list(np.asarray(scores)) == sorted(np.asarray(scores), reverse=True)


def test_repetition_penalty_lowers_seen_tokens_and_bad_settings_are_refused():
    logits_BV = jnp.array([[2.0, -1.0, 0.5, 1.0]])
    seen_BV = jnp.array([[True, True, False, False]])
    out = process_logits(logits_BV, seen_BV, Sampling(temperature=0.0, repetition_penalty=2.0))
    np.testing.assert_allclose(out, [[1.0, -2.0, 0.5, 1.0]])
    with pytest.raises(ValueError, match="top_p=0.0"):
        Sampling(top_p=0.0).check()
    model, params = tiny_model(**VARIANTS["rope_gqa"])
    with pytest.raises(ValueError, match="exceeds the model's context of 32 tokens"):
        decode.generate_batch(model, params, [np.arange(30)], 0, max_new_tokens=5, sampling=Sampling())
    assert dataclasses.asdict(Sampling()) == dict(temperature=1.0, top_k=0, top_p=1.0, repetition_penalty=1.0,
                                                         presence_penalty=0.0, frequency_penalty=0.0)
    with pytest.raises(ValueError, match="presence_penalty=2.5"):
        Sampling(presence_penalty=2.5).check()


def test_presence_and_frequency_penalties_are_additive_on_generated_counts():
    # OpenAI: logit[j] -= count[j] * frequency_penalty + (count[j] > 0) * presence_penalty.
    logits_BV = jnp.array([[2.0, -1.0, 0.5, 1.0], [2.0, -1.0, 0.5, 1.0]])
    count_BV = jnp.array([[3, 1, 0, 0], [0, 0, 2, 0]])
    seen_BV = jnp.ones((2, 4), bool)  # prompt tokens: the additive penalties ignore them
    sampling = Sampling(temperature=0.0, presence_penalty=0.5, frequency_penalty=-0.25)
    out = process_logits(logits_BV, seen_BV, sampling, count_BV)
    np.testing.assert_allclose(out, [[2.0 + 0.75 - 0.5, -1.0 + 0.25 - 0.5, 0.5, 1.0],
                                     [2.0, -1.0, 0.5 + 0.5 - 0.5, 1.0]])
    rows = Sampling(temperature=jnp.zeros(2), top_p=jnp.ones(2), repetition_penalty=jnp.ones(2),
                           presence_penalty=jnp.array([0.5, 0.0]), frequency_penalty=jnp.array([-0.25, 1.0]))
    np.testing.assert_allclose(process_logits(logits_BV, seen_BV, rows, count_BV),
                               [[2.25, -1.25, 0.5, 1.0], [2.0, -1.0, -1.5, 1.0]])


def test_int8_quantization_is_per_channel_close_and_nearly_four_times_smaller():
    from lm.inference import quantize

    model, params = tiny_model(**VARIANTS["rope_gqa"])
    quantized = quantize.quantize(params)
    kernel = quantized["layer_0/mlp/wi/kernel"]
    assert kernel["int8"].dtype == np.int8 and kernel["scale"].shape == (1, 2, 64)  # one scale per output
    assert quantized["embed/embedding"]["scale"].shape == (VOCAB, 1)  # one per token row
    restored = quantize.dequantize(quantized)
    for original, back in zip(jax.tree.leaves(params), jax.tree.leaves(restored)):
        step = np.max(np.abs(np.asarray(original))) / 127
        assert np.max(np.abs(np.asarray(original) - back)) <= step / 2 + 1e-7
    assert quantize.nbytes(params) / quantize.nbytes(quantized) > 3.0  # tiny model: its norms weigh more
    logits = model.apply({"params": params}, jnp.asarray(PROMPTS[0][None]))
    np.testing.assert_allclose(model.apply({"params": restored}, jnp.asarray(PROMPTS[0][None])), logits, atol=0.1)


def run_slots(model, params, size: int, schedule: dict[int, list]) -> dict[int, list[int]]:
    """Decodes with continuous batching: at step t, `schedule[t]` admits (slot, prompt,
    seed, sampling) entries; returns each slot's tokens since its last admission."""
    state, made = slots.empty(model, size), {}
    for t in range(max(schedule) + 8):
        for slot, prompt, seed, sampling in schedule.get(t, []):
            state, _ = slots.admit(model, params, state, slot, slots.padded_prompt(prompt, model.cfg.max_len, 0),
                                   len(prompt), seed, sampling)
            made[slot] = []
        token_B, _, state = slots.step(model, params, state)
        for slot in made:
            made[slot].append(int(token_B[slot]))
    return made


@pytest.mark.decode  # the server tests run continuous batching in the default suite
@pytest.mark.parametrize("variant", ["learned_bias", "rope_scanned"])
def test_continuous_batching_gives_each_request_the_tokens_it_gets_alone(variant):
    model, params = tiny_model(**VARIANTS[variant])
    greedy, warm = Sampling(temperature=0.0), Sampling(temperature=1.0, top_p=0.9,
                                                                     repetition_penalty=1.3)
    # Requests join at different steps, sample differently, and one slot is reused.
    together = run_slots(model, params, 4, {0: [(0, PROMPTS[0], 0, greedy)], 2: [(2, PROMPTS[1], 5, warm)],
                                            3: [(1, PROMPTS[2], 0, greedy)], 5: [(0, PROMPTS[1], 9, warm)]})
    alone = decode.generate_batch(model, params, [PROMPTS[2]], 0, max_new_tokens=8, sampling=greedy)[0]
    np.testing.assert_array_equal(together[1][:8], alone)
    for slot, seed in ((2, 5), (0, 9)):
        alone = run_slots(model, params, 1, {0: [(0, PROMPTS[1], seed, warm)]})[0]
        assert together[slot][:8] == alone[:8]
    assert together[2][:8] != together[0][:8]  # the seed, not the slot, decides a draw


@pytest.mark.parametrize("variant", ["rope_gqa", pytest.param("learned_bias", marks=pytest.mark.decode),
                                     pytest.param("rope_scanned", marks=pytest.mark.decode)])
def test_encoder_decoder_cached_decoding_equals_recomputing_the_decoder_at_every_step(variant):
    model, params = tiny_model(family="encoder_decoder", **VARIANTS[variant])
    inputs_BS = np.zeros((len(PROMPTS), 8), np.int32)  # right-padded; the encoder sees only real tokens
    for row, prompt in enumerate(PROMPTS):
        inputs_BS[row, :len(prompt)] = prompt
    valid_BS = inputs_BS != 0
    new_BT, logits_BTV = decode.generate_encoder_decoder(model, params, inputs_BS, valid_BS, jax.random.key(0),
                                                         max_new_tokens=8, sampling=Sampling(temperature=0.0))
    decoder_inputs_BT = np.concatenate([np.zeros((len(PROMPTS), 1), np.int32), np.asarray(new_BT)[:, :-1]], axis=1)
    full_BTV = jax.jit(model.apply)({"params": params}, inputs_BS, decoder_inputs_BT,
                                    input_segment_ids_BS=valid_BS.astype(np.int32))
    np.testing.assert_allclose(logits_BTV, full_BTV, atol=1e-5, rtol=0)
    np.testing.assert_array_equal(new_BT, np.argmax(full_BTV, axis=-1))


@pytest.mark.decode
def test_encoder_decoder_beam_search_with_one_beam_is_greedy_and_its_best_beam_is_at_least_as_likely():
    model, params = tiny_model(family="encoder_decoder", **VARIANTS["rope_gqa"])
    inputs_S = jnp.asarray(PROMPTS[0])

    def log_likelihood(output_T):
        decoder_inputs_T = jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.asarray(output_T)[:-1]])
        log_p_TV = jax.nn.log_softmax(model.apply({"params": params}, inputs_S[None], decoder_inputs_T[None])[0], -1)
        return float(jnp.sum(log_p_TV[jnp.arange(len(output_T)), output_T]))

    greedy_BT, _ = decode.generate_encoder_decoder(model, params, inputs_S[None], jnp.ones((1, len(PROMPTS[0])), bool),
                                                   jax.random.key(0), max_new_tokens=6,
                                                   sampling=Sampling(temperature=0.0))
    one, _ = beam_search_encoder_decoder(model, params, inputs_S, beam_size=1, max_new_tokens=6)
    np.testing.assert_array_equal(one[0], greedy_BT[0])
    beams, scores = beam_search_encoder_decoder(model, params, inputs_S, beam_size=4, max_new_tokens=6)
    assert log_likelihood(beams[0]) >= log_likelihood(greedy_BT[0]) - 1e-5
    assert float(scores[0]) == pytest.approx(log_likelihood(beams[0]), abs=1e-4)
    text_only, _ = beam_search_encoder_decoder(model, params, inputs_S, beam_size=4, max_new_tokens=6,
                                                      text_vocab_size=10)
    assert int(jnp.max(text_only)) < 10  # sentinels and other non-text ids are never chosen


@pytest.mark.decode
def test_the_sample_cli_writes_an_encoder_decoder_runs_output_for_a_prompt(tmp_path):
    config = f"--config={os.path.join(REPO, 'configs', 'shakespeare_char.py')}"
    run_cli("lm.main", config, f"--workdir={tmp_path}", *cli_flags(
        train__steps=3, model__family="encoder_decoder", objective__name="span_corruption", objective__extra_ids=20))
    result = run_cli("lm.sample", f"--workdir={tmp_path}", "--prompt=ROMEO: But soft", "--max_new_tokens=8",
                     "--temperature=0")
    assert "input: ROMEO: But soft\noutput: " in result.stdout
    output = result.stdout.split("output: ", 1)[1].rstrip("\n")
    assert len(output) <= 8  # one character per token, stopping early at <eos>
    beams = run_cli("lm.sample", f"--workdir={tmp_path}", "--prompt=ROMEO: But soft", "--max_new_tokens=8",
                    "--beam_size=3", "--num_samples=2")
    assert beams.stdout.count("output: ") == 2 and "--- beam 2 of 3, score " in beams.stdout


def test_the_sample_cli_refuses_a_count_out_of_range_before_loading_the_run():
    """--num_samples=-1 printed nothing and exited 0; now every number has its range."""
    result = run_cli("lm.sample", "--workdir=/nonexistent/run", "--num_samples=-1", check=False, timeout=120)
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert result.stderr.startswith("lm: error: flag --num_samples=-1: -1 is not a positive integer. Fix:")
