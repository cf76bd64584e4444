"""The OpenAI-compatible HTTP door: an app factory (``app.py``) and one APIRouter per
endpoint family (chat, completions, embeddings, models + service endpoints)."""
