"""Searching codes: the built-in inverted index (CPU and torch devices), texts beside an index, and Qdrant."""
