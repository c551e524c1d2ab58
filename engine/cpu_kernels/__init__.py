"""The engine's own CPU kernels in C (built for this CPU on first use, see build.py)."""
