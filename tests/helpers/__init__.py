"""Shared test helpers (not test files): paths, tiny networks and phantoms, MOTS-like data, an evaluation oracle."""
