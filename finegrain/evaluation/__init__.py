"""Measures of what a model looked at, against CUB's ground-truth boxes and part points."""
