"""Tests of mirrorrouter/api/ (test_real_* run the real gateway, registries, clients)."""
