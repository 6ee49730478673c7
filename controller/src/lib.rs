//! The Bulkhead node agent, CLI and lab.
