"""File formats: CSV readings in, CSV results out."""
