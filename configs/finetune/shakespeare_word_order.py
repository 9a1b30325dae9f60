"""Is this line as Shakespeare wrote it, or are its words shuffled? Fine-tuning the
Shakespeare model on an acceptability task built from its own corpus.

First pretrain (the README's first command), then compare full fine-tuning, LoRA and a
frozen backbone (a linear probe):

    python -m lm.main --config=configs/shakespeare_char.py --workdir=runs/shakespeare_char
    python -m lm.finetune --config=configs/finetune/shakespeare_word_order.py --workdir=runs/word_order \
        --config.init_from=runs/shakespeare_char

4,000 lines of 5+ words, lower-cased and without punctuation, half with their words
shuffled (70/15/15 split; lm/finetuning/datasets.py). The table printed at the end gives
each method's test accuracy and trainable parameters beside the majority-class baseline
(about 0.52). Expected on a 2-core CPU (about 8.5 minutes): see the README's fine-tuning
section for the figures measured.
"""

from lm.configs.finetune import base


def get_config():
    config = base.get_config()
    config.compare = ("full", "lora", "frozen")
    config.task.builder = "shakespeare_word_order"
    config.task.max_examples = 4000
    config.task.seq_len = 64  # the pretraining context: lines are at most about 60 characters
    config.finetune.steps = 600
    config.finetune.eval_every = 50
    config.finetune.patience = 6
    return config
