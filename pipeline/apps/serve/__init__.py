"""Serving a model over HTTP: OpenAI's chat-completions API and a web chat page (`stages=[serve]`).

schema.py holds the request format and its checks, images.py turns image URLs into pixels, worker.py the one
thread that owns the model and answers every family's requests (batched where the family batches requests,
else one at a time), app.py the routes and the server itself.
"""
