"""Test helpers shipped with dfk8s (the fake API server), so a cluster test can run them from the image.

Nothing is imported here on purpose: `python -m dfk8s.testing.fake_api` must find its module unloaded.
"""
