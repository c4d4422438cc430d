"""Test helpers shipped with dfk8s (fake API server, S3, tiny-model fixtures), so cluster tests can run them.

Nothing is imported here on purpose: `python -m dfk8s.testing.fake_api` must find its module not yet loaded.
"""
