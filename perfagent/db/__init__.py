"""Database query capture: driver hooks, SQL fingerprints, application call sites."""
