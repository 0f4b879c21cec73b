"""Tests of mirrorrouter/config/ (test_real_* run the real gateway, registries, clients)."""
