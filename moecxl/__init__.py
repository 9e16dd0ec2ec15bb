"""moecxl: Mixture-of-Experts inference with experts offloaded across memory tiers."""

__version__ = "0.1.0"
