"""Who speaks this speech? Four speakers of four plays, from the Shakespeare model.

First pretrain (the README's first command), then compare full fine-tuning, LoRA and a
frozen backbone:

    python -m lm.main --config=configs/shakespeare_char.py --workdir=runs/shakespeare_char
    python -m lm.finetune --config=configs/finetune/shakespeare_speakers.py --workdir=runs/speakers \
        --config.init_from=runs/shakespeare_char

Classes: ROMEO, MENENIUS, PETRUCHIO, DUKE VINCENTIO (676 speeches; 70/15/15 split). The
table printed at the end gives each method's test accuracy and trainable parameters
beside the majority-class baseline. A hard task for a 0.8M-parameter character model,
not yet tuned: a first run (learning rate 3e-4 for every method, otherwise these
settings) gave test accuracy 0.310 full, 0.333 LoRA, 0.262 frozen, against 0.274 for
the majority class. configs/finetune/shakespeare_word_order.py is the tuned recipe.
"""

from lm.configs.finetune import base


def get_config():
    config = base.get_config()
    config.compare = ("full", "lora", "frozen")
    config.task.builder = "shakespeare_speakers"
    config.task.speakers = ("ROMEO", "MENENIUS", "PETRUCHIO", "DUKE VINCENTIO")
    config.task.seq_len = 128
    config.finetune.steps = 400
    config.finetune.eval_every = 25
    return config
