"""YAML recipes shipped as package data."""
