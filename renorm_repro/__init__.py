"""Reproduction of the paper's experiments (Ioffe, 2017, arXiv:1702.03275) with ``renorm.tf``."""
