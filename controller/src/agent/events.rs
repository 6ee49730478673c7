//! What the agent does when woken: by its source (a change), by the slow tick (host
//! addresses, host veths, lost flows), or by a CNI ADD waiting for its pod.

use bulkhead_api::{code, EndpointSpec, Response};

use super::core::{AddReply, Agent};
use crate::error_chain;
use crate::metrics::ErrorKind;

/// Every this many slow ticks, endpoints whose host veth is gone are dropped (a DEL the
/// agent missed).
pub(super) const RECONCILE_EVERY_TICKS: u32 = 5;

impl Agent {
    /// The source signalled a change (or its poll interval passed): re-read and reprogram.
    pub(super) fn on_change(&mut self) {
        // Watch failures the source retried by itself still count as errors.
        let failures = self.source.failures();
        for _ in self.source_failures..failures {
            self.metrics.error(ErrorKind::Source);
        }
        self.source_failures = failures;
        match self.refresh(false) {
            Err(e) => {
                self.metrics.error(e.kind());
                // A bad manifest fails every poll until it is fixed: log it once, and its end.
                let text = error_chain(&e);
                if self.last_source_error.as_deref() != Some(text.as_str()) {
                    tracing::warn!(error = %text, "model source; the previous model stays in force");
                    self.last_source_error = Some(text);
                }
            }
            Ok(()) => {
                if self.last_source_error.take().is_some() {
                    tracing::info!("model source readable again");
                }
            }
        }
    }

    /// The slow tick: this node's addresses, lost flow records, and now and then the host
    /// veths; then whatever changed is programmed.
    pub(super) fn on_tick(&mut self) {
        self.read_host_addresses();
        match self.datapath.flows_lost() {
            Ok(lost) => self.flows.set_lost(lost),
            Err(e) => tracing::debug!(error = %error_chain(&e), "reading lost flow events"),
        }
        if let Some(forensics) = self.flows.forensics() {
            forensics.retry();
        }
        self.ticks = self.ticks.wrapping_add(1);
        if self.ticks.is_multiple_of(RECONCILE_EVERY_TICKS) {
            if let Err(e) = self.reconcile_links() {
                tracing::warn!(error = %error_chain(&e), "reconciling endpoints with host veths");
            }
        }
        self.on_change();
    }

    /// Adds and programs `spec` once the agent is ready and knows its pod; `None` means not
    /// yet (the caller waits and asks again, then answers [`Agent::not_yet`]).
    #[cfg(test)]
    pub(super) fn try_add(&mut self, spec: &EndpointSpec) -> Option<Response> {
        self.can_add(spec).then(|| self.add_endpoint(spec.clone()))
    }

    /// Admits `spec` once the agent is ready and knows its pod, for the next commit to
    /// program and answer ([`Agent::admit_endpoint`]); gives `reply` back when not yet.
    pub(super) fn try_admit(&mut self, spec: &EndpointSpec, reply: AddReply) -> Result<(), AddReply> {
        if !self.can_add(spec) {
            return Err(reply);
        }
        self.admit_endpoint(spec.clone(), reply);
        Ok(())
    }

    /// Whether the agent is ready and knows the pod of `spec`.
    fn can_add(&mut self, spec: &EndpointSpec) -> bool {
        // The pod may have been written after the last wake: re-read before waiting.
        if self.cluster.pod(&spec.pod_namespace, &spec.pod_name).is_none() {
            if let Err(e) = self.refresh(true) {
                self.metrics.error(e.kind());
                tracing::warn!(error = %error_chain(&e), "reloading the model");
            }
        }
        self.ready && self.cluster.pod(&spec.pod_namespace, &spec.pod_name).is_some()
    }

    /// The answer to an ADD whose wait ran out: try again later.
    pub(super) fn not_yet(&self, spec: &EndpointSpec) -> Response {
        let message = if self.ready {
            format!("pod {}/{} is not known to the agent yet", spec.pod_namespace, spec.pod_name)
        } else {
            "the agent has not finished its first sync with the cluster".to_string()
        };
        Response::Error {
            code: code::TRY_AGAIN_LATER,
            message,
        }
    }
}
