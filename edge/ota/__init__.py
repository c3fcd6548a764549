"""Over-the-air model updates: TUF trust, A/B model slots, a health-gated commit (docs/ota.md)."""
