//! The agent's Unix-socket API, used by the CNI plugin, the lab and the CLI.
//!
//! One request per connection: the client writes one JSON object and a newline, the
//! agent answers with one JSON object and a newline, then closes. The exception is
//! [`Request::Observe`], answered by a stream of [`Flow`] objects, one per line (see
//! [`observe`]).

pub mod anomaly;
pub mod client;
pub mod code;
pub mod endpoint;
pub mod explain;
pub mod flow;
pub mod frame;
pub mod mac;
pub mod message;
pub mod name;
pub mod protocol;
pub mod relay;

pub use anomaly::{Anomaly, AnomalyKind, AnomalyRequest, ForensicsBundle, QuarantineInfo};
pub use client::{
    anomalies_relay, call, call_relay, observe, observe_relay, AnomalyStream, ApiError, ObserveError, ObserveEvent, ObserveEvents,
    ObserveStream, RelayAddr,
};
pub use endpoint::{EndpointRef, EndpointSpec};
pub use explain::{BackendExplanation, ExplainSide, ExplainVerdict, Explanation, ServiceExplanation};
pub use flow::{
    Direction, Flow, FlowBytes, FlowFilter, FlowKind, FlowPeer, FlowService, FlowVerdict, ObserveRequest, PolicyName, PolicyRule,
};
pub use frame::{read_line_limited, Envelope, MAX_LINE_BYTES, PROTOCOL_VERSION};
pub use mac::MacAddr6;
pub use message::{AgentStatus, Request, Response};
pub use name::NamespacedName;
pub use protocol::Protocol;
pub use relay::{Gap, GapLine, GapReason, RelayNodeStatus, RelayStatus, SeqFlow, StreamCursor, StreamHeader, StreamHello};
