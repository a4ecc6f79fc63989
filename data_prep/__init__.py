"""condmoe: data_prep."""
