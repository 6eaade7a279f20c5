"""ragline: a fast, cache-first RAG server and library."""
