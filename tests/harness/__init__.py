"""Tests of the test harness itself (tests/support/): real registries, the token server,
the fault proxy, the client runners."""
