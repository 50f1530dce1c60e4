"""gemma4_agent: a camera stream in, safe action commands out, with Gemma 4 Unified.

Importing the package imports nothing heavy; each subpackage pulls in what it needs.
"""

__version__ = "0.1.0"
