"""Faust agents that normalize, deduplicate and seal readings into encrypted Parquet."""
