"""Predictions out: FastAPI nodes that follow published versions and answer /predict."""
