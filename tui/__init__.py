"""`python -m tui`: the operator's dashboard for an Orchard cluster, an HTTP client of rank 0's admin
API (it imports nothing of the engine, so it runs on any machine that can reach rank 0)."""
