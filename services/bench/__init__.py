"""`ecoserve bench`: a goodput benchmark client for any OpenAI-compatible server (see __main__.py)."""
