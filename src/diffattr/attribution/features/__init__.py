"""Features: per-sample gradients of a measure, their projection and the on-disk store."""
