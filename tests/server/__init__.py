"""Tests of mirrorrouter/server/ (test_real_* run the real gateway, registries, clients)."""
