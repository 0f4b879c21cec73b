"""Tests of mirrorrouter/pull/ (test_real_* run the real gateway, registries, clients)."""
