"""CaseDesk: the Anthropic Messages API in front of llama.cpp's llama-server."""

__version__ = "0.1.0"
