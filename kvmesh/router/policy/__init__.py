"""Routing policies: one module each, one protocol (``base.Policy``), one factory.

A policy sees the candidate workers of a request (already filtered by model, adapter
and role) and picks one; ``factory.make_policy`` builds one by its configured name.
"""
