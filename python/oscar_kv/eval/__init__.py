"""Evaluation helpers: a real model (SmolLM2 from a GGUF file), KV capture, fidelity harnesses."""
