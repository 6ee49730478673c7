//! The agent's state lives on one dedicated OS thread: compiling, netlink and disk writes
//! block, and must not hold up the tokio workers that serve the socket and metrics.

use std::sync::mpsc;
use std::thread::JoinHandle;

use tokio::sync::oneshot;

use super::core::Agent;

/// Work for the agent's thread.
type Job = Box<dyn FnOnce(&mut Agent) + Send>;

/// The agent's thread has stopped (it panicked, or the agent is shutting down).
#[derive(Clone, Copy, Debug, thiserror::Error)]
#[error("the agent has stopped")]
pub(super) struct Stopped;

/// A handle on the agent's thread; cloned by every connection and the event loop.
#[derive(Clone, Debug)]
pub(super) struct AgentHandle {
    jobs: mpsc::Sender<Job>,
}

impl AgentHandle {
    /// Moves `agent` onto a thread of its own, which runs jobs in order until every handle
    /// is dropped.
    pub(super) fn spawn(mut agent: Agent) -> std::io::Result<(Self, JoinHandle<()>)> {
        let (jobs, queue) = mpsc::channel::<Job>();
        let thread = std::thread::Builder::new().name("bulkhead-agent".into()).spawn(move || {
            while let Ok(job) = queue.recv() {
                job(&mut agent);
                // What is queued already runs before the ADDs admitted so far are
                // programmed: a burst of ADDs costs one reprogram, not one each.
                while let Ok(job) = queue.try_recv() {
                    job(&mut agent);
                }
                agent.commit_adds();
            }
        })?;
        Ok((AgentHandle { jobs }, thread))
    }

    /// Runs `f` on the agent's thread and returns its result.
    pub(super) async fn call<R, F>(&self, f: F) -> Result<R, Stopped>
    where
        R: Send + 'static,
        F: FnOnce(&mut Agent) -> R + Send + 'static,
    {
        let (reply, answer) = oneshot::channel();
        let job: Job = Box::new(move |agent| {
            // The caller may have gone (its connection closed): nobody to answer.
            let _ = reply.send(f(agent));
        });
        self.jobs.send(job).map_err(|_| Stopped)?;
        answer.await.map_err(|_| Stopped)
    }

    /// Runs `f` on the agent's thread, which answers through the sender it is given, then
    /// or later (an ADD is answered when the agent's thread commits it).
    pub(super) async fn call_with_reply<R, F>(&self, f: F) -> Result<R, Stopped>
    where
        R: Send + 'static,
        F: FnOnce(&mut Agent, oneshot::Sender<R>) + Send + 'static,
    {
        let (reply, answer) = oneshot::channel();
        let job: Job = Box::new(move |agent| f(agent, reply));
        self.jobs.send(job).map_err(|_| Stopped)?;
        answer.await.map_err(|_| Stopped)
    }
}
