"""Fine-tuning a pretrained run on a task (datasets, LoRA, optimizers, the loop); `python -m lm.finetune` runs it."""
