"""Harnesses shared by the fault and soak tests: real servers and processes to break on purpose."""
