"""mmed-rag."""
