"""The local executor (``dfk8s run``): long-lived worker processes on this machine."""
