//! `LISTEN` on a connection of its own (outside the pool): PostgreSQL's notifications, for
//! changes other processes or a direct SQL edit made (the definitions trigger of migration V4).

use futures::StreamExt;
use tokio::sync::mpsc;
use tokio_postgres::AsyncMessage;

use super::{Store, StoreError};

/// The channel the definitions trigger notifies, with the business id as payload.
pub const DEFINITIONS_CHANNEL: &str = "icmp_definitions";

/// Notifications of one channel. The stream ends (`None`) when the connection is lost:
/// notifications sent meanwhile are not delivered, so the caller must assume anything changed.
pub struct Notifications {
    _client: tokio_postgres::Client,
    rx: mpsc::UnboundedReceiver<String>,
}

impl std::fmt::Debug for Notifications {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Notifications").finish_non_exhaustive()
    }
}

impl Notifications {
    /// The next payload; `None` once the connection is gone.
    pub async fn next(&mut self) -> Option<String> {
        self.rx.recv().await
    }
}

impl Store {
    /// Opens a connection and listens on `channel` (an identifier, not user input).
    ///
    /// # Errors
    /// Connection failures.
    pub async fn listen(&self, channel: &str) -> Result<Notifications, StoreError> {
        let (client, mut connection) = self.pg.connect(self.tls.clone()).await?;
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
            while let Some(Ok(message)) = messages.next().await {
                if let AsyncMessage::Notification(n) = message
                    && tx.send(n.payload().to_owned()).is_err()
                {
                    break;
                }
            }
        });
        client.batch_execute(&format!("LISTEN {channel}")).await?;
        Ok(Notifications {
            _client: client,
            rx,
        })
    }
}
