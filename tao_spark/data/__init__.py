"""Data that ships with the package: the sample prompt log (see README.md here for how it is built)."""

from pathlib import Path

SAMPLE_PROMPTS = Path(__file__).with_name("prompts.jsonl")
