"""Figures and an HTML page for run folders (``rigl report``)."""
