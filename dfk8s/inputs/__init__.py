"""The input stage: manifests (JSON, JSONL, Parquet, folders), rows, images (local, S3, http)."""
