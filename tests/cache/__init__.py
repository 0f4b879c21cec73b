"""Tests of mirrorrouter/cache/ (test_real_* run the real gateway, registries, clients)."""
