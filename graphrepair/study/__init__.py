"""Measurements along the path between two models (accuracy, loss, barriers, variance collapse, LLFC) and their tables and plots."""
