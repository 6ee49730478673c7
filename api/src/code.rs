//! One table of error codes for everything that answers a CNI runtime or a client of the
//! agent's socket: the CNI spec's codes, then Bulkhead's own from 100.

/// Incompatible CNI version.
pub const INCOMPATIBLE_VERSION: u32 = 1;
/// Invalid necessary environment variables.
pub const INVALID_ENVIRONMENT: u32 = 4;
/// Failure to decode content.
pub const DECODING_FAILURE: u32 = 6;
/// Invalid network config.
pub const INVALID_NETWORK_CONFIG: u32 = 7;
/// Try again later.
pub const TRY_AGAIN_LATER: u32 = 11;
/// Plugin not available (STATUS).
pub const PLUGIN_NOT_AVAILABLE: u32 = 50;
/// The address pool is exhausted.
pub const POOL_EXHAUSTED: u32 = 100;
/// A netlink or namespace operation failed.
pub const NETLINK: u32 = 101;
/// The agent rejected the endpoint or answered nonsense.
pub const AGENT_REJECTED: u32 = 102;
/// The IPAM store could not be read or written.
pub const IPAM_STORE: u32 = 103;
/// CHECK found the attachment not as ADD left it.
pub const CHECK_FAILED: u32 = 104;
/// The request was well-formed but a value in it is not acceptable (an unknown drop
/// reason, a malformed pod name, an unknown protocol).
pub const INVALID_REQUEST: u32 = 105;
/// The client did not prove it may read flows (a missing or wrong token).
pub const UNAUTHORIZED: u32 = 106;
/// The pod named is not known: not in the model, and nothing is kept of it.
pub const UNKNOWN_POD: u32 = 107;
