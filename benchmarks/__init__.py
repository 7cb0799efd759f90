"""Performance benchmarks (not tests): each prints what it measured in one run."""
