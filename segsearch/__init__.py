"""segsearch: segment retrieval with SPML pixel embeddings."""
__version__ = "0.1.0"
