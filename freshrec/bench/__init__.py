"""Benchmarks: each module measures freshrec beside a baseline in one run."""
