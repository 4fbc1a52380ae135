"""Several in-process sites for the demo and the tests, and the demo itself."""
