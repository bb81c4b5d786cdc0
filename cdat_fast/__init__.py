"""cdat-fast: curvature-aware learning-rate tuners for Optax."""
