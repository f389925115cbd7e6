"""Inference engines behind one protocol (sim, transformers, exllamav2), and what they share."""
