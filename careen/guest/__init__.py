"""Guests: the tree of a mounted image, and how careen changes it."""
