"""Tenancy: what keeps the site's many clients and their data apart: whose a request is (owners), what it
may spend (quotas), what it spent (usage), one conversation continued at a time (conversation_lock)."""
