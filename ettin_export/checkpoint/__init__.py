"""Stage 1, the checkpoint: a sentence-transformers CrossEncoder folder or hub id, a plain
ModernBertForSequenceClassification, or a random-weights checkpoint of an exact Ettin size, in the
packed model's terms (config, weights, score activation, CrossEncoder's max-length rule)."""

from ettin_export.checkpoint.load import (
    Checkpoint,
    CheckpointError,
    load_checkpoint,
    open_source,
    random_checkpoint_dir,
    resolve_source,
)

__all__ = ["Checkpoint", "CheckpointError", "load_checkpoint", "open_source", "random_checkpoint_dir", "resolve_source"]
