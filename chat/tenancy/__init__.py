"""Tenancy: whose request a generation is (owners), what it may spend (quotas), what it spent (usage)."""
