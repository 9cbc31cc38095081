"""Train the reference GPT on 4 local CPU workers through Ray with a searched plan: the quickest way
to see galvatron work end to end on any machine (a few minutes on 2 cores)."""

from galvatron.launch.demo import add_arguments, run

__all__ = ["add_arguments", "run"]
