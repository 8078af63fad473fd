"""Versions out: consistent delta checkpoints and snapshots of the trainer's model, to Redis."""
