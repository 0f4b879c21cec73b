"""Tests of mirrorrouter/upstream/ (test_real_* run the real gateway, registries, clients)."""
