"""feedback: click events, pair mining, contrastive fine-tuning, the evaluation gate and promotion.

This room is filled by the feedback-loop work (DESIGN.md, "The flow"); nothing is exported yet.
"""

__all__: list[str] = []
