"""Benchmarks: scripts that print figures, run by hand (make bench), recorded in the README."""
