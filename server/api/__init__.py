"""HTTP layer: FastAPI app, routes, wire types, completions service, settings and CLI.

Imports the engine and the model; nothing below imports from here.
"""
