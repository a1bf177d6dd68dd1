"""Callbacks: one public callback per file, thin hooks over pure functions (re-exported from the package root)."""
