"""tao_spark: Test-time Adaptive Optimization on Spark — tune a language model from prompts alone."""

__version__ = "0.1.0"
