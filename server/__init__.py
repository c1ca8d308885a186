"""Squall: a realtime hub on Tornado speaking the Centrifugo client protocol."""

__version__ = "0.1.0"
