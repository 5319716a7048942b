"""`python -m tui`: the operator's dashboard for an Orchard cluster (an HTTP client of rank 0's admin API)."""
