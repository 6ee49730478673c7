//! The policy compiler.
