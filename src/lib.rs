//! Examples and end-to-end tests host.
