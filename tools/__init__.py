"""Maintainer tools (not installed with sc2quant): the embedded model's training, its corpus,
and the rebuild of calib_data/."""
