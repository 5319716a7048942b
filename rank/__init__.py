"""`python -m rank`: one MLX rank of an Orchard job (rank 0 also serves HTTP and schedules)."""
