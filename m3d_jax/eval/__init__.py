"""M3D-Bench evaluation: per-sample metrics (`metrics`), in the reference's definitions and the standard ones."""
