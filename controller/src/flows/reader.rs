//! The reader of the datapath's flow ring buffer, and datapath time as Unix time.

use std::sync::Arc;
use std::time::Duration;

use aya::maps::{MapData, RingBuf};
use bulkhead_common::{FlowEvent, FLOW_EVENT_V1_SIZE, FLOW_READ_INTERVAL_MS};
use tokio::io::unix::AsyncFd;
use tokio::time::MissedTickBehavior;

use super::{FlowStore, DRAIN_BATCH};

/// Why the flow reader failed.
#[derive(Debug, thiserror::Error)]
pub enum FlowsError {
    /// The ring buffer fd could not be registered with the runtime.
    #[error("cannot poll the flow ring buffer")]
    Poll {
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

/// Converts `bpf_ktime_get_ns` (CLOCK_MONOTONIC) readings into Unix time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Clock {
    /// Realtime minus monotonic, in nanoseconds.
    offset_ns: i128,
}

impl Clock {
    /// The offset between the two clocks now.
    pub fn now() -> Self {
        let realtime = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as i128)
            .unwrap_or(0);
        Clock {
            offset_ns: realtime - monotonic_ns(),
        }
    }

    /// A clock with a given offset (tests).
    pub fn with_offset(offset_ns: i128) -> Self {
        Clock { offset_ns }
    }

    /// Unix time in nanoseconds of a monotonic reading.
    pub fn unix_ns(&self, monotonic_ns: u64) -> i128 {
        i128::from(monotonic_ns) + self.offset_ns
    }
}

fn monotonic_ns() -> i128 {
    // CLOCK_MONOTONIC always exists on Linux; 0 only makes times wrong, never panics.
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|ts| i128::from(ts.tv_sec()) * 1_000_000_000 + i128::from(ts.tv_nsec()))
        .unwrap_or(0)
}

/// Reads one [`FlowEvent`] out of a ring buffer record; `None` when it is too short.
///
/// A record of [`FLOW_EVENT_V1_SIZE`] bytes comes from a program attached before the byte
/// counts (it runs until the upgraded agent replaces it): it reads as a packet record, its
/// counts 0 (its `kind` byte was padding, always 0).
pub fn decode(bytes: &[u8]) -> Option<FlowEvent> {
    let len = bytes.len().min(size_of::<FlowEvent>());
    if len < FLOW_EVENT_V1_SIZE {
        return None;
    }
    let mut ev = FlowEvent::default();
    // SAFETY: `len` bytes are in `bytes` and fit in `ev` (at most its size); FlowEvent is
    // #[repr(C)] plain data for which every bit pattern is valid (it is aya::Pod), so any
    // prefix of it written over a valid value leaves a valid value.
    unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), std::ptr::from_mut(&mut ev).cast::<u8>(), len) };
    Some(ev)
}

/// Starts the task that drains the `bh_flow_v1` ring buffer into `store`; it runs until
/// the runtime stops. Must be called inside a tokio runtime.
///
/// The datapath wakes this task only once the ring holds
/// [`capacity::FLOW_RING_WAKEUP_BYTES`](bulkhead_common::capacity::FLOW_RING_WAKEUP_BYTES)
/// unread (a wakeup per record is what made new flows expensive); every
/// [`FLOW_READ_INTERVAL_MS`] it also reads whatever is there, so a record waits at most that
/// long.
pub fn spawn_reader(ring: RingBuf<MapData>, store: Arc<FlowStore>) -> Result<tokio::task::JoinHandle<()>, FlowsError> {
    // SAFETY: the RingBuf owns its map fd; it stays open, and the same fd, until the RingBuf
    // is dropped, which only happens when this AsyncFd is.
    let registered = unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) };
    let mut ring = registered.map_err(|e| FlowsError::Poll { source: e.into() })?;
    Ok(tokio::spawn(async move {
        let mut batch = Vec::with_capacity(DRAIN_BATCH);
        let mut tick = tokio::time::interval(Duration::from_millis(FLOW_READ_INTERVAL_MS));
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                ready = ring.readable_mut() => match ready {
                    // Cleared before draining: a record that lands meanwhile is read below
                    // or wakes the task again, never left behind.
                    Ok(mut guard) => guard.clear_ready(),
                    Err(e) => {
                        tracing::error!(error = %e, "flow ring buffer poll failed; flow records stop");
                        return;
                    }
                },
                _ = tick.tick() => {}
            }
            // Drained in batches until the ring is empty.
            loop {
                let full = drain(ring.get_mut(), &mut batch);
                if batch.is_empty() {
                    break;
                }
                store.record(&batch);
                batch.clear();
                // A busy ring must not starve the socket tasks on the agent's two workers.
                tokio::task::yield_now().await;
                if !full {
                    break;
                }
            }
        }
    }))
}

/// Moves records from `ring` into `batch` until it is empty or `batch` holds
/// [`DRAIN_BATCH`]; whether it stopped for a full batch. Allocates nothing.
fn drain(ring: &mut RingBuf<MapData>, batch: &mut Vec<FlowEvent>) -> bool {
    while let Some(item) = ring.next() {
        match decode(&item) {
            Some(ev) => batch.push(ev),
            None => tracing::debug!(len = item.len(), "short flow record"),
        }
        if batch.len() == DRAIN_BATCH {
            return true;
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use bulkhead_common::flow_kind;

    fn bytes_of(ev: &FlowEvent) -> Vec<u8> {
        // SAFETY: FlowEvent is plain data without padding (asserted in the ABI crate).
        unsafe { std::slice::from_raw_parts(std::ptr::from_ref(ev).cast::<u8>(), size_of::<FlowEvent>()) }.to_vec()
    }

    #[test]
    fn records_of_both_sizes_decode_and_shorter_ones_do_not() {
        let ev = FlowEvent {
            timestamp_ns: 7,
            endpoint_id: 10,
            saddr: [10, 0, 0, 1],
            sport: [0x9c, 0x40],
            packet_len: 60,
            protocol: 6,
            service_id: 3,
            kind: flow_kind::UPDATE,
            to_destination: 1234,
            to_source: 99_999,
            ..FlowEvent::default()
        };
        let new = bytes_of(&ev);
        assert_eq!(new.len(), 64);
        assert_eq!(decode(&new), Some(ev));
        // A ring record may be padded past the struct: the rest is ignored.
        let mut padded = new.clone();
        padded.extend_from_slice(&[0xff; 8]);
        assert_eq!(decode(&padded), Some(ev));
        // An old program's record: the first 48 bytes, kind 0 (was padding), no counts.
        let old_ev = FlowEvent {
            kind: flow_kind::PACKET,
            to_destination: 0,
            to_source: 0,
            ..ev
        };
        let old = &bytes_of(&old_ev)[..FLOW_EVENT_V1_SIZE];
        let decoded = decode(old).expect("an old record decodes");
        assert_eq!(decoded, old_ev);
        assert_eq!((decoded.kind, decoded.to_destination, decoded.to_source), (flow_kind::PACKET, 0, 0));
        assert_eq!(decode(&new[..FLOW_EVENT_V1_SIZE - 1]), None);
        assert_eq!(decode(&[]), None);
    }
}
