"""Plumbing shared by every service; only seq.py and follow.py are pure core code."""
