"""Tests of mirrorrouter/access/ (test_real_* run the real gateway, registries, clients)."""
