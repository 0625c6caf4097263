"""muralist: a self-hosted, multi-user Stable Diffusion service with AUTOMATIC1111 conventions."""

__version__ = "0.1.0"
