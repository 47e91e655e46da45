"""Settings per environment: base, local (default), test, production."""
