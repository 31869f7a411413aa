"""Data that ships with the package: the sample prompt log and inference table (README.md here: how they are built)."""

from pathlib import Path

SAMPLE_PROMPTS = Path(__file__).with_name("prompts.jsonl")
# Reference answers for the supervised baseline (train.method=sft_labels); the loop itself never reads them.
SAMPLE_REFERENCES = Path(__file__).with_name("references.jsonl")
# A Model Serving inference table in the AI Gateway payload schema (Delta, Change Data Feed on); see
# build_inference_table.py.
SAMPLE_INFERENCE_TABLE = Path(__file__).with_name("acme_assistant_payload")
