"""The schema of an `lm` run: every field, its default and what it means.

Recipes (configs/*.py) start from `get_config()` and override values; configs/base.py
re-exports it, so `from lm.configs import base` in a recipe reads this file. The returned
config is locked: a recipe or a command-line override that names a field not listed here
fails at once with a "did you mean" hint, instead of being silently ignored.

    python -m lm.main --config=configs/base.py --workdir=/tmp/lm_base

trains a small character model on the embedded Shakespeare corpus (the same run as
`configs/shakespeare_char.py`, whose docstring gives the expected result). The allowed
values of the choice fields are in `lm.config.choices`; `lm.config.validation` checks a
config against them.
"""

import os

import ml_collections

from lm.config import choices

# The corpora shipped with lm (lm/data/corpora/<name>/input.txt), found from this file's
# place in the package rather than through lm.data, which sits above lm.config.
EMBEDDED_CORPORA = os.path.join(os.path.dirname(os.path.dirname(__file__)), "data", "corpora")

# Logical axis -> mesh axes. Parameters use `vocab, embed, heads, head_dim, mlp, fused,
# position, norm`; activations use `batch, length` and the `act_*` names, so FSDP can
# shard a parameter's `embed` dimension without also sharding the activations' model
# dimension. One table serves pure data parallel, FSDP and tensor parallel: a mesh axis
# of size 1 is a no-op.
DEFAULT_RULES = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("fused", None),
    ("position", None),
    ("norm", None),
    # The stacked-layer axis of scanned parameters: pipeline stages hold consecutive layers
    # (lm.model.pipeline). With stage=1 (the default mesh) it shards nothing.
    ("layers", "stage"),
)


def get_config() -> ml_collections.ConfigDict:
    """Every field of a run with its default, locked: setting a name not listed here raises
    AttributeError with a "did you mean" hint."""
    c = ml_collections.ConfigDict()
    # One seed for initialisation, data order and dropout: a run is a function of
    # (config, seed), so a resumed run repeats the batches and noise it would have seen.
    c.seed = 0
    c.data = _data()
    c.model = _model()
    # The pretraining objective: "causal" (GPT) or "prefix_lm" (bidirectional prefix, loss
    # on the rest) for the decoder family; "masked_lm" (BERT) for the encoder;
    # "span_corruption" (T5) for the encoder-decoder; "mixture" (UL2's mixture of
    # denoisers) for the encoder-decoder or the decoder. Each sub-config holds its paper's defaults.
    c.objective = _objective()
    c.optim = _optim()
    c.train = _train()

    c.eval = e = ml_collections.ConfigDict()
    e.batch_size = 64  # rows per validation batch
    e.num_batches = 0  # 0: the whole validation split, in order, without overlap

    # Knowledge distillation (Hinton et al. 2015): the loss adds alpha * T^2 * KL(teacher
    # || student) on temperature-T softened next-token distributions to (1 - alpha) times
    # the usual cross-entropy. teacher: a run's workdir or an export with the same
    # tokenizer (a causal decoder); "" trains without one.
    c.distill = ml_collections.ConfigDict(dict(teacher="", temperature=2.0, alpha=0.5))

    c.sample = s = ml_collections.ConfigDict()
    s.prompt = "\n"  # printed sample at the end of training starts from this text
    s.max_new_tokens = 300  # 0: no sample (e.g. the points of a sweep)
    s.temperature = 0.8
    s.top_k = 200  # 0: sample from the full distribution

    # Bookkeeping for scaling-law sweeps (lm.sweep), carried into the results table; no
    # effect on training. budget: the IsoFLOP budget (FLOPs) a point belongs to, 0: none.
    c.sweep = ml_collections.ConfigDict(dict(budget=0.0, target_parameters=0.0))

    c.mesh = _mesh()
    c.sharding = ml_collections.ConfigDict()
    c.sharding.rules = DEFAULT_RULES

    c.lock()
    return c


def _data() -> ml_collections.ConfigDict:
    """The corpus, its cleaning, the tokenizer and the rows."""
    d = ml_collections.ConfigDict()
    d.name = "tinyshakespeare"  # corpus name; names the built TFDS dataset
    # Files, directories or glob patterns (`**` recurses) of .txt, .jsonl (one document a
    # line) and their .gz forms (UTF-8), .jsonl.zst, .parquet, and folders written by
    # `datasets`' save_to_disk (lm.data.sources).
    d.files = (os.path.join(EMBEDDED_CORPORA, "tinyshakespeare", "input.txt"),)
    # The column (JSONL field) holding a document's text in .jsonl, .parquet and datasets inputs.
    d.text_column = "text"
    # Rows kept: comparisons of metadata columns joined by `and`, e.g.
    # 'language == "en" and score >= 3'; "" keeps every row.
    d.where = ""
    # Several corpora mixed in training: name -> ConfigDict(files=(...), weight=w) and,
    # optionally, its own text_column and where; rows are drawn in proportion to the
    # weights and validation scores the union. Empty: one corpus, `files`. Sources share
    # the options below and the tokenizer.
    d.sources = ml_collections.ConfigDict()
    d.unit = "file"  # a .txt file's documents: "file" (one), "paragraph" or "line"
    d.normalize = "none"  # Unicode normal form: "none", "NFC" or "NFKC"
    # "tail": validation is the last validation_fraction of each file (nanoGPT's split);
    # "hash": each document goes to validation when its content hash says so.
    d.split = "tail"
    d.validation_fraction = 0.1
    # Quality rules, each dropping a document that breaks it; 0 turns a rule off.
    # `lm.data.cleaning.GOPHER_RULES` holds Gopher's values for web text.
    d.filters = _filters()
    # Deduplication across both splits; the first copy of a document is kept.
    d.dedup = _dedup()
    # How the corpus is built: "memory" (every kept document in one process; small
    # corpora) or "datatrove" (lm.data.build: stages in bounded memory, on one machine,
    # Slurm or Ray; needs split="hash").
    d.build = "memory"
    # "char" (vocabulary of the train split), "byte" (UTF-8) or "sentencepiece".
    d.tokenizer = "char"
    # SentencePiece: an existing .model file, or "" to train one on the train split with
    # the settings below (cached by corpus and settings; `python -m lm.tokenizer`).
    d.sentencepiece = _sentencepiece()
    # Rows: "stream" cuts windows from the split's documents joined by <eos> (nanoGPT);
    # "pack" packs whole documents (+ <eos>) into rows with segment ids and positions
    # that restart per document, so attention never crosses documents.
    d.packing = "stream"
    d.seq_len = 64  # tokens per row: the model's context length
    # Built datasets and token caches; "" means $LM_DATA_DIR, else ~/.cache/lm/data.
    d.data_dir = ""
    d.num_threads = 2  # Grain read threads that assemble batches ahead of the step
    d.prefetch = 4  # batches Grain keeps ready
    return d


def _filters() -> ml_collections.ConfigDict:
    """Quality rules; 0 turns a rule off."""
    f = ml_collections.ConfigDict()
    f.min_chars = 0
    f.max_chars = 0
    f.min_words = 0
    f.max_words = 0
    f.max_non_alpha_fraction = 0.0  # of non-space characters that are not letters
    f.max_duplicate_line_fraction = 0.0  # of a document's lines repeating an earlier line
    f.max_top_bigram_fraction = 0.0  # of word characters in the most frequent word bigram
    f.max_duplicate_ngram_fraction = 0.0  # of word characters in repeated word n-grams
    f.duplicate_ngram_size = 5  # n for max_duplicate_ngram_fraction
    return f


def _dedup() -> ml_collections.ConfigDict:
    """Deduplication across both splits."""
    dd = ml_collections.ConfigDict()
    dd.exact = True  # identical documents
    dd.near_threshold = 0.0  # MinHash LSH Jaccard threshold, e.g. 0.8; 0 turns it off
    dd.num_perm = 128  # MinHash permutations (accuracy vs. memory)
    dd.shingle_words = 5  # word n-gram shingles compared by MinHash
    return dd


def _sentencepiece() -> ml_collections.ConfigDict:
    """How a SentencePiece tokenizer is found or trained."""
    sp = ml_collections.ConfigDict()
    sp.model = ""
    sp.model_type = "bpe"  # "bpe" or "unigram"
    sp.vocab_size = 2000
    sp.byte_fallback = True  # unknown characters become bytes, so any text round-trips
    # Strings kept whole as one piece each, e.g. markup ("<br>") or a corpus's own markers.
    # They are data, not control: text that spells one encodes to its piece, which decodes
    # back to that text and is an ordinary token to every objective. Control ids (<pad>,
    # <eos>) and the objectives' markers ([MASK], sentinels, task tokens: objective.extra_ids)
    # are never produced from text.
    sp.user_defined_symbols = ()
    sp.max_sentences = 1_000_000  # documents sampled to train on
    return sp


def _model() -> ml_collections.ConfigDict:
    """The architecture."""
    m = ml_collections.ConfigDict()
    # "decoder" (GPT / LLaMA, causal), "encoder" (BERT, bidirectional, masked-LM head) or
    # "encoder_decoder" (T5: bidirectional encoder, causal decoder with cross-attention).
    m.family = "decoder"
    m.num_decoder_layers = 0  # encoder_decoder: decoder depth; 0 = num_layers
    m.num_layers = 4
    m.num_heads = 4
    m.d_model = 128
    m.head_dim = 0  # 0: d_model // num_heads
    m.d_ff = 0  # MLP hidden size; 0: 4 * d_model (GELU) or 8/3 * d_model rounded (SwiGLU)
    m.vocab_size = 0  # 0: the tokenizer's vocabulary size
    m.positions = "learned"  # "learned" absolute embeddings or "rope" (rotary)
    m.rope_theta = 10_000.0  # rotary base frequency
    m.norm = "layernorm"  # "layernorm" or "rmsnorm" (pre-norm blocks, final norm)
    m.norm_eps = 1e-5
    m.activation = "gelu"  # MLP: "gelu" (exact), "gelu_tanh", "relu" or "swiglu"
    m.use_bias = False  # biases in dense layers and LayerNorm
    m.tie_embeddings = True  # output projection shares the token embedding
    m.dropout = 0.0  # on attention outputs, MLP outputs and embeddings
    m.dtype = "float32"  # compute dtype ("bfloat16" on accelerators); params stay float32
    m.init_std = 0.02  # normal init; residual projections get init_std / sqrt(2 * num_layers)
    m.num_kv_heads = 0  # grouped-query attention: key/value heads (divides num_heads); 0 = num_heads
    # One nn.scan over stacked layers: compile time stays flat as depth grows (use for deep
    # models); False unrolls a Python loop (parameters named layer_0, layer_1, ...).
    m.scan_layers = False
    # Recompute each layer's activations in the backward pass to save memory: "none",
    # "full" (keep nothing), "dots_saveable" or "dots_with_no_batch_dims_saveable".
    m.remat = "none"
    # The attention kernel: "auto" (a fused kernel where the platform has one: splash on
    # TPU, cuDNN on GPU; XLA elsewhere), "xla" (jax.nn.dot_product_attention's XLA path,
    # which holds the [B, H, L, L] scores), "splash" (TPU, Pallas) or "cudnn" (GPU).
    m.attention = "auto"
    # "standard" or "mup" (µP, lm.model.mup: hidden init / sqrt(m), hidden Adam rate / m,
    # attention q.k / head_dim, logits / m, with m = d_model / mup_base_width), so that
    # learning rate and init tuned at mup_base_width transfer to wider models.
    m.parametrization = "standard"
    m.mup_base_width = 0  # µP: the d_model hyperparameters were tuned at; 0 = unset
    return m


def _objective() -> ml_collections.ConfigDict:
    """The pretraining objective and each one's paper defaults."""
    ob = ml_collections.ConfigDict()
    ob.name = "causal"
    ob.z_loss = 0.0  # PaLM's log(Z)^2 coefficient (1e-4 in PaLM); 0 turns it off
    # Ids appended after the tokenizer's: masked LM's [MASK] is the first, span
    # corruption's sentinels the first `n` (one per noise span of a row); a mixture's
    # task tokens come first, then its sentinels. lm.objectives.extra_ids_needed counts them.
    ob.extra_ids = 0
    ob.prefix_lm = ml_collections.ConfigDict(dict(prefix_fraction=0.0))  # 0: uniform random split
    ob.masked_lm = ml_collections.ConfigDict(dict(rate=0.15, mask_prob=0.8, random_prob=0.1))
    ob.span_corruption = ml_collections.ConfigDict(dict(noise_density=0.15, mean_span_length=3.0))
    # Mixture: a preset from lm.objectives.mixture.PRESETS ("ul2": UL2's R, S and X
    # denoisers with task tokens [NLU], [S2S], [NLG]), or, in a config file, `denoisers`
    # as a tuple of dicts of lm.objectives.Denoiser's fields, which replaces the preset:
    # dict(kind="span_corruption", task="[NLU]", weight=1.0, noise_density=0.15, mean_span_length=3.0)
    # or dict(kind="prefix_lm", task="[S2S]", target_fraction=0.25)  (0: a uniform split).
    ob.mixture = ml_collections.ConfigDict(dict(preset="ul2", denoisers=()))
    return ob


def _optim() -> ml_collections.ConfigDict:
    """The optimizer, its parameter groups and its learning-rate schedule (lm.training.optim)."""
    o = ml_collections.ConfigDict()
    # "adamw"; "adam" and "sgd" (weight decay as L2 on the gradient, PyTorch's); "adafactor";
    # "lion" (b1, b2; usually 3-10x lower lr than AdamW); "muon" (Muon on hidden matrices at lr,
    # often ~0.02; AdamW with b1, b2, eps on embeddings, head, norms and biases, at lr times their
    # groups' lr_scale); "schedule_free_adamw" (b1 is its
    # averaging beta; schedule must be "constant": warmup, then no decay; evaluation, samples and
    # exports use its averaged parameters). All from optax.
    o.name = "adamw"
    o.sgd = ml_collections.ConfigDict(dict(momentum=0.9, nesterov=False))  # momentum 0: plain SGD
    # Muon's momentum (beta), Newton-Schulz iterations and Nesterov momentum (optax.contrib.muon).
    o.muon = ml_collections.ConfigDict(dict(momentum=0.95, ns_steps=5, nesterov=True))
    # Parameter groups (lm.training.param_groups), by what a parameter is: matrix (hidden
    # kernels), embedding (token and position tables; the head too when tied), head (the untied
    # unembed kernel), norm (norm scales and biases), bias (dense biases). lr_scale multiplies
    # the schedule's rate (0 freezes the group); weight_decay is the group's decoupled decay, -1: optim.weight_decay.
    # The defaults are lm's AdamW: one rate, decay on matrices, embeddings and head only.
    o.groups = ml_collections.ConfigDict({
        name: ml_collections.ConfigDict(dict(lr_scale=1.0, weight_decay=-1.0 if name in ("matrix", "embedding",
                                                                                        "head") else 0.0))
        for name in choices.PARAM_GROUPS})
    o.lr = 1e-3  # peak learning rate
    # After linear warmup: "cosine", "linear", "constant", "rsqrt", "wsd", "step", "cyclical"
    # or "cosine_restarts" (lm.training.schedules; the README's table).
    o.schedule = "cosine"
    o.warmup_steps = 100
    o.decay_steps = 0  # steps of warmup + decay; 0: train.steps
    o.final_lr = 1e-4  # the rate at the end of a decay or cooldown, and the trough of a cycle
    # wsd (warmup, stable, decay): the cooldown is the last fraction of the decay length,
    # in (0, 1). 0.2 and "1-sqrt" are Hägele et al. 2024's choice: a 20% 1-sqrt cooldown
    # matched or beat cosine, ahead of linear ("linear" and "cosine" are also allowed).
    o.cooldown_fraction = 0.2
    o.cooldown_shape = "1-sqrt"
    o.step_boundaries = ()  # step: the steps (after the warmup, increasing) where the rate is
    o.step_gamma = 0.1  # multiplied by this, in (0, 1]
    o.cycle_mode = "triangular"  # cyclical: "triangular" (Smith 2017) or "one_cycle" (Smith & Topin 2018)
    o.cycle_steps = 1000  # triangular's period (lr -> final_lr -> lr); one_cycle rises over warmup_steps
    o.restart_steps = 1000  # cosine_restarts (SGDR): the first period, cosine from lr to final_lr,
    o.restart_mult = 2.0  # each next period this many times longer (SGDR's T_mult; 1: equal periods)
    o.b1 = 0.9
    o.b2 = 0.99  # nanoGPT's choice for small models; 0.95 is usual at scale
    o.eps = 1e-8
    o.weight_decay = 0.1  # decoupled (AdamW); by default never applied to norms or biases (optim.groups)
    o.grad_clip = 1.0  # global-norm clip; 0 disables
    return o


def _train() -> ml_collections.ConfigDict:
    """Steps, batch, logging and checkpoint cadence."""
    t = ml_collections.ConfigDict()
    t.steps = 2000
    t.batch_size = 12  # global rows per step, across all devices and processes
    # Gradient accumulation: the step runs the batch in this many slices (a lax.scan),
    # holding one slice's activations at a time; the update equals the full batch's.
    # With pipeline stages (mesh.shape.stage > 1) they are the pipeline's microbatches
    # instead, all in flight in one step (at least as many as stages).
    t.microbatches = 1
    # Peak FLOP/s of one device for the MFU in the training log and the goodput; 0 looks the device
    # up in lm.model.counting.PEAK_FLOPS (TPUs, recent NVIDIA GPUs), measures it on CPU
    # (lm.training.peak) and omits MFU on an accelerator missing from the table.
    t.peak_flops_per_device = 0.0
    t.log_every = 10  # steps between metric records (JSONL, TensorBoard, progress bar)
    t.eval_every = 250  # steps between validation passes; 0: only at the end
    t.checkpoint_every = 250  # steps between checkpoints; one is always written at the end
    t.keep_checkpoints = 3  # most recent checkpoints kept on disk
    # Permanent checkpoints: every step that is a multiple of this is saved and never
    # deleted (0: none), beside the newest keep_checkpoints frequent ones.
    t.permanent_checkpoint_every = 0
    # Steps whose checkpoints are also saved and never deleted, e.g. a WSD stable run's branch
    # points (lm.scaling.designs.wsd_branches): a tuple of steps, () for none.
    t.keep_steps = ()
    # A branch: a run in a new workdir starts from the checkpoint at step branch_step of the
    # run in workdir branch_from (its parameters, optimizer state, step and data position,
    # so it sees the batches that run would have), then trains to `steps` under this
    # config's schedule. Once the branch has checkpoints of its own it resumes from them.
    # "": no branch, a fresh start.
    t.branch_from = ""
    t.branch_step = 0
    # A step with a NaN/Inf loss or gradient never updates the state. Up to this many such
    # steps are skipped; one more stops the run (exit status 3). 0: stop at the first.
    t.max_nonfinite_steps = 0
    return t


def _mesh() -> ml_collections.ConfigDict:
    """The device mesh."""
    mesh = ml_collections.ConfigDict()
    # Devices per mesh axis; -1 takes the devices the other axes leave. data x fsdp
    # splits the batch; fsdp also shards parameters; tensor shards heads and MLP.
    # stage > 1 is pipeline parallelism (lm.model.pipeline): the layers split into that many
    # stages of consecutive layers, train.microbatches flowing through them.
    mesh.shape = ml_collections.ConfigDict(dict(stage=1, data=-1, fsdp=1, tensor=1))
    # Across TPU slices or GPU nodes (the data-center network): slices per axis, usually
    # dict(data=<slices>) or dict(stage=<slices>) (pipeline stages over the slow links, only
    # activations crossing them). `shape` is then the mesh within one slice.
    mesh.dcn_shape = ml_collections.ConfigDict(dict(stage=1, data=1, fsdp=1, tensor=1))
    # A circular (interleaved) pipeline: each device runs this many stages (virtual stages)
    # of num_layers / (stages x repeats) layers, the bubble shrinking to
    # (S - 1) / (M R + S - 1). 1: GPipe.
    mesh.pipeline_repeats = 1
    # CPU only: how many XLA devices to split the host into. One device per core runs
    # the step's ops in parallel (XLA's CPU runtime executes each op on one core);
    # 0 picks the core count, lowered to divide train and eval batch sizes.
    mesh.cpu_devices = 0
    return mesh
