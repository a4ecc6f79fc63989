"""condmoe: train."""
