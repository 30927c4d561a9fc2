"""Credentials: password hashing, API tokens, encryption of secrets at rest."""
