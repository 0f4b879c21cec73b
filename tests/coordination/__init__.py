"""Tests of mirrorrouter/coordination/ (test_real_* run the real gateway, registries, clients)."""
