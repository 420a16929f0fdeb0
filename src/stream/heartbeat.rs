//! Keeping held entries alive. A worker holds an entry from the moment it is delivered or
//! reclaimed until it is finished or given up, whatever it waits on (its turn, a processing
//! slot, the LLM). One heartbeat per worker refreshes every held id in a few scripts; a refresh
//! is also the ownership check: an entry that another consumer now owns, or that is no longer
//! pending, is reported so the worker drops it at once.

use redis::Value;

use super::{Streams, array};
use crate::error::StreamError;

/// `KEYS[1]` = inbound; `ARGV` = group, consumer, ids… Returns one code per id: 0 refreshed
/// (idle time reset, still ours), 1 gone (no longer pending), 2 taken (another consumer owns it).
/// Only entries this consumer owns are touched: a refresh never takes an entry back.
pub(crate) const KEEP_ALIVE_SCRIPT: &str = script!("keep_alive");

/// Ids per script call.
const CHUNK: usize = 500;

/// What a refresh found for one held entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refresh {
    /// Still ours; its idle time is reset.
    Kept,
    /// No longer pending: acked by someone, deleted, or its consumer was deleted.
    Gone,
    /// Another consumer owns it now (it reclaimed it).
    Taken,
}

impl Streams {
    /// Refreshes every id in `ids`; returns the ones that are no longer ours.
    pub async fn keep_alive(&self, ids: &[String]) -> Result<Vec<(String, Refresh)>, StreamError> {
        let mut lost = Vec::new();
        for chunk in ids.chunks(CHUNK) {
            let mut inv = self.scripts.keep_alive.prepare_invoke();
            inv.key(&self.config.inbound)
                .arg(&self.config.group)
                .arg(&self.consumer);
            for id in chunk {
                inv.arg(id.as_str());
            }
            let reply: Value = inv.invoke_async(&mut self.conn()).await?;
            let codes = array(reply)
                .filter(|c| c.len() == chunk.len())
                .ok_or_else(|| StreamError::UnexpectedReply("keep-alive".into()))?;
            for (id, code) in chunk.iter().zip(codes) {
                let verdict = match code {
                    Value::Int(0) => Refresh::Kept,
                    Value::Int(1) => Refresh::Gone,
                    Value::Int(2) => Refresh::Taken,
                    _ => return Err(StreamError::UnexpectedReply("keep-alive code".into())),
                };
                if verdict != Refresh::Kept {
                    lost.push((id.clone(), verdict));
                }
            }
        }
        Ok(lost)
    }
}
