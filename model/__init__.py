"""AttentionLSTM, data loading, metrics and checkpoints (the training issue fills this in)."""
