"""Training: data loading with streaming-identical features, stateful truncated BPTT, checkpoints."""
