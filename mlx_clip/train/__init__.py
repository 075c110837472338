"""Fine-tuning: the training loop and compiled step, optimizer groups and schedules, checkpoints, LoRA and WiSE-FT."""
