"""Tenancy: what keeps the site's many clients and their data apart (policies, one module each)."""
