"""Text-side helpers shared by the engine driver and the router; nothing here imports torch."""

from services.text.detokenizer import DetokenizerDelta, IncrementalDetokenizer

__all__ = ["DetokenizerDelta", "IncrementalDetokenizer"]
