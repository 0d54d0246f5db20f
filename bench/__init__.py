"""Benchmarks behind `make bench`: figures printed and written to bench/results/, never asserted."""
