"""Celery adapters for the Fleet core: the app and thin tasks. The only package that imports Celery."""
