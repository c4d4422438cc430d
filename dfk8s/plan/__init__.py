"""The plan stage: check every row, size and write the shards, and the launch front door."""
