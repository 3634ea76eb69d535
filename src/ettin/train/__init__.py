"""Training: the DeepSpeed engine over megatron groups, checkpoints, metrics and the train loop."""
