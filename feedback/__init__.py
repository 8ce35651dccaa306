"""feedback: the search log, click events, pair mining, fine-tuning, the evaluation gate and promotion."""

from feedback.events import record_search

__all__ = ["record_search"]
