"""Serving a model over HTTP: OpenAI's chat-completions API and a web chat page (`stages=[serve]`).

schema.py holds the request format and its checks, images.py turns image URLs into pixels, batching.py the
worker thread that batches concurrent requests for generation, app.py the routes and the server itself.
"""
