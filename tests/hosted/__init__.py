"""Tests of mirrorrouter/hosted/ (test_real_* run the real gateway, registries, clients)."""
