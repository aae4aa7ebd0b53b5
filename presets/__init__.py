"""Shipped YAML presets, installed as data (see ``forge.presets.presets_dir``)."""
