"""Small reference models: tests, examples and the demo train these."""

from galvatron.models.gpt import GPT, GPTConfig

__all__ = ["GPT", "GPTConfig"]
