"""Simulated wearables that speak the same wire formats as real devices."""
