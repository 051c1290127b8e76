"""Experiments: the paper tables, their plans at each scale, the runner (``runner``)."""
