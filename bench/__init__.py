"""Side-by-side benchmarks of posttrain against TRL (`make bench`, `python -m bench`)."""
