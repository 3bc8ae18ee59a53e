"""Real inference engines for the tests, installed into caches of their own."""
