"""Executors start workers and the reducer: local processes, or Kubernetes Jobs."""
