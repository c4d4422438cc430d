"""The map stage: one shard through one pipeline and serving, resumable at any moment."""
