"""The fleet's side of onboarding: claim codes and the HTTPS enrollment endpoint (docs/onboarding.md)."""
