"""Tests of mirrorrouter/cli/ (test_real_* run the real gateway, registries, clients)."""
