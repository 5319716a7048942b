"""Pure coordination logic for Orchard: no MLX, MPI, Textual or FastAPI imports live here."""
