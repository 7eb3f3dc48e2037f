//! meshnet control plane.
