"""Stage 4, delivery: the outbox goes to each destination until accepted (``sender``),
and what a person can ask for when something failed (``recovery``).
"""
