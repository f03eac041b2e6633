"""The pieces of ``python -m qlora_ext.finetune``: the config (its schema, ``${...}`` interpolation,
torchtune configs), data, model setup, the step (loss, precision, compile, activation
checkpointing), optimizer and schedule, evaluation, metric loggers, memory stats, loss-curve
plotting, checkpoint saving, training-state checkpoints (resume) and the output folder's lock."""
