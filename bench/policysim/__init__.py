"""A trace-driven simulator of cache eviction policies (issue 12); see README.md here."""
