"""llamad: a supervisor daemon for llama.cpp's llama-server.

Kept import-free on purpose: ``llamactl`` imports ``llamad.protocol`` and must
not pay for the daemon's dependencies.
"""

__version__ = "0.1.0"
