"""Every field of a fine-tuning config, with its default. Recipes start from this.

    python -m lm.finetune --config=configs/finetune/shakespeare_speakers.py --workdir=/tmp/speakers
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.init_from = ""  # a pretrained run's workdir, an lm export, or an imported Hugging Face model
    # Run each of these methods in workdir/<method> and print a comparison table; () runs
    # finetune.method alone in workdir.
    c.compare = ()

    c.task = t = ml_collections.ConfigDict()
    t.kind = "classification"  # "classification", "token_classification" or "sft"
    # JSONL files: classification {"text", "label"}; token_classification {"words", "tags"};
    # sft {"prompt", "response"}. Or a builder from lm.finetuning.datasets.
    t.train_file = ""
    t.validation_file = ""
    t.test_file = ""  # optional; the best checkpoint is scored on it
    # "shakespeare_speakers" (who speaks this speech?) or "shakespeare_word_order" (is this
    # line as written, or shuffled?): tasks built from the embedded corpus (lm/finetuning/datasets.py)
    t.builder = ""
    t.speakers = ()  # shakespeare_speakers: the classes
    t.max_examples = 0  # shakespeare_word_order: a seeded sample of this many lines; 0 = all
    t.labels = ()  # the classes in order; () takes the training labels, sorted
    t.seq_len = 0  # tokens per example (longer ones are truncated); 0: the pretrained context
    t.pooling = "last"  # classification: "last" token (a causal decoder has read everything) or "mean"

    c.finetune = f = ml_collections.ConfigDict()
    f.method = "full"  # "full", "lora" (adapters + head) or "frozen" (head only)
    f.steps = 300
    f.batch_size = 16
    # Full fine-tuning's peak rate: below pretraining's 1e-3, to move the pretrained weights a little.
    f.learning_rate = 1e-4
    # Methods that train few parameters from scratch take larger steps (LoRA's paper used 2e-4
    # to 1e-3 for its adapters; a linear probe converges faster still).
    f.frozen_learning_rate = 1e-3
    f.warmup_steps = 20
    f.weight_decay = 0.01
    f.grad_clip = 1.0
    f.dropout = 0.1
    f.eval_every = 25
    f.patience = 4  # early stop after this many evaluations without a better validation score; 0: never
    f.freeze = ""  # a regex: backbone parameters whose path matches it stay fixed (e.g. "embed|layer_[01]/")
    f.layer_decay = 1.0  # discriminative rates: layer at depth d below the head trains at lr * layer_decay**d
    f.unfreeze_every = 0  # gradual unfreezing: depth d starts training at step d * unfreeze_every; 0: off
    f.export_merged = False  # write workdir/merged: the tuned backbone (LoRA merged) as an lm export
    f.lora = ml_collections.ConfigDict(dict(rank=8, alpha=16.0, targets=r"attn/(qkv|q|kv|out)|mlp/w[io]",
                                            learning_rate=1e-3))
    return c
