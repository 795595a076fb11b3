"""Use cases the CLI and the web share: history, status, dead letters, the audit, metrics, health,
the webhook's signature."""
