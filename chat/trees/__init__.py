"""Conversations as trees: the operations on a stored conversation's messages (regenerate, edit, continue,
select, delete, stop) and the replies that run on without their client (running.py)."""
