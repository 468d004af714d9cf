"""refine-tta's HTTP server (FastAPI). Only HTTP lives here; the work is done by ``refine_tta.engine``.

Importing this package imports nothing heavy; build an app with ``server.app.create_app``.
"""
