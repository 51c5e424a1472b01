"""``corral serve``: the HTTP API over the sandboxes of one process.

``_app`` builds the FastAPI app; ``_service`` owns the sandboxes and every
per-sandbox table; ``_store`` is the database; ``_serve`` runs the process.
"""
