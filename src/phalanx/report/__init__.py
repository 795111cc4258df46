"""Reporting: the live terminal display (HTML reports come later)."""
