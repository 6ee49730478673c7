//! The agent's Unix-socket API, used by the CNI plugin, the lab and the CLI.
//!
//! One request per connection: the client writes one JSON object and a newline, the
//! agent answers with one JSON object and a newline, then closes.

use std::io::{BufRead, BufReader, Write};
use std::net::Ipv4Addr;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// A request to the agent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Register a pod's interface; answered once its endpoint and policy are in the maps.
    AddEndpoint(EndpointSpec),
    /// Forget an endpoint; succeeds when it is unknown.
    DelEndpoint(EndpointRef),
    /// Check that the agent knows and enforces this endpoint.
    CheckEndpoint(EndpointRef),
    /// Forget every endpoint not in `valid` (CNI GC), deleting its host veth if still present.
    Gc {
        /// The attachments the runtime still knows (`cni.dev/valid-attachments`).
        valid: Vec<EndpointRef>,
    },
    /// Re-read the manifests source; answered once the result is in the maps.
    Reload,
    /// The agent's status.
    Status,
}

/// Names one attachment: a container's interface.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct EndpointRef {
    /// `CNI_CONTAINERID`.
    pub container_id: String,
    /// `CNI_IFNAME`.
    pub ifname: String,
}

/// Everything the agent needs to enforce policy on a new pod interface.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointSpec {
    /// `CNI_CONTAINERID`.
    pub container_id: String,
    /// `CNI_IFNAME` inside the pod.
    pub ifname: String,
    /// `CNI_NETNS`.
    pub netns: String,
    /// `K8S_POD_NAMESPACE` from `CNI_ARGS`.
    pub pod_namespace: String,
    /// `K8S_POD_NAME` from `CNI_ARGS`.
    pub pod_name: String,
    /// Name of the host-side veth, in the agent's network namespace.
    pub host_ifname: String,
    /// Ifindex of the host-side veth.
    pub host_ifindex: u32,
    /// The pod's address.
    pub ipv4: Ipv4Addr,
    /// The pod-side MAC, `aa:bb:cc:dd:ee:ff`.
    pub mac: String,
}

/// The agent's answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Response {
    /// Done.
    Ok,
    /// The agent's status.
    Status(AgentStatus),
    /// Failed; `code` follows the CNI error codes (11: try again later; ours from 100).
    Error {
        /// CNI-style error code.
        code: u32,
        /// What went wrong, lowercase.
        message: String,
    },
}

/// What `Request::Status` reports.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentStatus {
    /// The node this agent runs on.
    pub node_name: String,
    /// True once the first full sync is in the maps.
    pub ready: bool,
    /// Local endpoints.
    pub endpoints: usize,
    /// Allocated identities.
    pub identities: usize,
    /// NetworkPolicies in the model.
    pub policies: usize,
    /// Policy entries in the datapath.
    pub policy_entries: usize,
    /// Bumped each time the maps are reprogrammed.
    pub generation: u64,
}

/// Why a call to the agent failed.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The socket could not be reached.
    #[error("cannot connect to agent socket {path}")]
    Connect {
        /// Socket path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Reading or writing the socket failed.
    #[error("agent socket {path}: i/o error")]
    Io {
        /// Socket path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The agent answered something that is not a response.
    #[error("agent socket {path}: malformed response")]
    Decode {
        /// Socket path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: serde_json::Error,
    },
}

/// Sends one request and waits up to `timeout` for the answer.
pub fn call(socket: &Path, request: &Request, timeout: Duration) -> Result<Response, ApiError> {
    let io = |source| ApiError::Io {
        path: socket.to_path_buf(),
        source,
    };
    let mut stream = UnixStream::connect(socket).map_err(|source| ApiError::Connect {
        path: socket.to_path_buf(),
        source,
    })?;
    stream.set_read_timeout(Some(timeout)).map_err(io)?;
    stream.set_write_timeout(Some(timeout)).map_err(io)?;
    let mut line = serde_json::to_vec(request).map_err(|source| ApiError::Decode {
        path: socket.to_path_buf(),
        source,
    })?;
    line.push(b'\n');
    stream.write_all(&line).map_err(io)?;
    let mut answer = String::new();
    BufReader::new(stream).read_line(&mut answer).map_err(io)?;
    serde_json::from_str(&answer).map_err(|source| ApiError::Decode {
        path: socket.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_tagged_json() {
        let r = Request::DelEndpoint(EndpointRef {
            container_id: "c1".into(),
            ifname: "eth0".into(),
        });
        let s = serde_json::to_string(&r).unwrap();
        assert_eq!(s, r#"{"op":"del_endpoint","container_id":"c1","ifname":"eth0"}"#);
        assert_eq!(serde_json::from_str::<Request>(&s).unwrap(), r);
        let gc = Request::Gc {
            valid: vec![EndpointRef {
                container_id: "c2".into(),
                ifname: "eth0".into(),
            }],
        };
        let s = serde_json::to_string(&gc).unwrap();
        assert_eq!(s, r#"{"op":"gc","valid":[{"container_id":"c2","ifname":"eth0"}]}"#);
        assert_eq!(serde_json::from_str::<Request>(&s).unwrap(), gc);
        let e: Response = serde_json::from_str(r#"{"result":"error","code":11,"message":"pod unknown"}"#).unwrap();
        assert_eq!(
            e,
            Response::Error {
                code: 11,
                message: "pod unknown".into()
            }
        );
    }
}
