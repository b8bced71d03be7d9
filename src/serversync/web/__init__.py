"""The REST API (FastAPI) and the server-rendered admin UI."""
