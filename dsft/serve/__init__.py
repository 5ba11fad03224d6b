"""Using a run: generation, chat and (later) the HTTP server."""
