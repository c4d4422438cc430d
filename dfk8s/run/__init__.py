"""A run's records on storage: its spec, the key layout, lease, progress, breaker and status."""
