"""Training-loop pieces under ``python -m qlora_ext.finetune``: config, data, optimizer and
schedule, metric loggers and memory stats, loss-curve plotting, training-state checkpoints."""
