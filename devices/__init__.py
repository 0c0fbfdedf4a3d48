"""Device profiles (data) and the profiler that measures on this host and estimates elsewhere."""
