"""The test harness, shared by tests/ and bench/: real servers on loopback ports (`servers`) and the
tiny models the tests build (`tiny_models`). Nothing here is imported by the daemon."""
