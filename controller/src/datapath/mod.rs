//! The kernel side as the agent drives it: loading and pinning the programs and maps
//! ([`load`]), the per-endpoint conntrack tables ([`conntrack`]), what the maps must hold ([`state`], the Service part from the service table:
//! [`services`]), writing the difference ([`sync`]) and reading the datapath's counters ([`stats`]); the XDP programs' attachment ([`xdp`]) and the
//! uplink prefilter's lists ([`prefilter`]).

pub mod conntrack;
pub mod load;
pub mod prefilter;
pub mod services;
pub mod state;
pub mod stats;
pub mod sync;
pub mod xdp;

pub use load::{ensure_pin_dir, Datapath, DatapathError};
pub use state::DatapathState;
