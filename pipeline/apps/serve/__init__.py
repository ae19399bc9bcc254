"""Serving a model over HTTP: OpenAI's chat-completions API and a web chat page (`stages=[serve]`).

schema.py holds the request format and its checks, images.py turns image URLs into pixels, batching.py the
worker thread that batches concurrent requests for MiniCPM-V-2, family_worker.py the one that answers a
transformers-native family's requests one at a time, app.py the routes and the server itself.
"""
