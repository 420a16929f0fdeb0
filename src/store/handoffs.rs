//! Handoffs in the store: an agent's answer stored as a message of role `agent` (and the
//! handoff ended when the agent says so), the timeout reply of a handoff nobody answered, and
//! an operator's start, end and list. Each write is one transaction scoped to its business that
//! changes the conversation's version, so that a message read before it runs again after it;
//! each statement filters `business_id` (single-shard on Citus).

use tokio_postgres::types::Json;
use uuid::Uuid;

use super::{Prepared, Store, StoreError};
use crate::model::HandoffState;

/// A stored agent's answer (duplicate: it was stored before, by its idempotency key).
#[derive(Debug, Clone, PartialEq)]
pub enum AgentStored {
    /// The conversation is not (any more) with a person.
    NotActive,
    /// No conversation of that business has this id.
    UnknownConversation,
    /// The key answered another conversation of the user.
    KeyReused,
    /// Stored now (or before, when `duplicate`): the message row (`None`: an `end` without
    /// text stores none) and where the answer goes.
    Stored {
        row: Option<Uuid>,
        to: UserAddress,
        duplicate: bool,
    },
}

/// Where a message to the user goes, and what its reply entry names.
#[derive(Debug, Clone, PartialEq)]
pub struct UserAddress {
    pub user_id: String,
    /// The user's latest `reply_to` while handed off (`None`: the outbound stream).
    pub reply_to: Option<String>,
    /// The conversation's stage (its name).
    pub stage: String,
}

/// What an agent's answer asks.
#[derive(Debug, Clone, PartialEq)]
pub struct AgentAnswer<'a> {
    pub business_id: Uuid,
    pub conversation_id: Uuid,
    pub agent_id: &'a str,
    /// The agent's idempotency key.
    pub key: &'a str,
    /// Empty: no message (an `end` alone).
    pub text: &'a str,
    /// End the handoff: the conversation goes back to the bot (see [`BackTo`]).
    pub end: bool,
    pub back_to: &'a BackTo,
}

/// Where an ended handoff leaves the conversation: a conversation in one of the business's
/// handoff stages goes back to `stage` (its initial one); one elsewhere stays where it is.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct BackTo {
    pub stage: Option<Uuid>,
    pub handoff_stages: Vec<Uuid>,
}

impl BackTo {
    /// For `business`: its initial stage, from its handoff stages.
    pub fn of(business: &crate::model::Business) -> BackTo {
        BackTo {
            stage: Some(business.initial_stage_id),
            handoff_stages: business
                .stages
                .iter()
                .filter(|s| s.handoff)
                .map(|s| s.id)
                .collect(),
        }
    }
}

/// The conversation with its user and handoff: `$1` business, `$2` conversation.
pub const CONVERSATION: &str = "\
SELECT c.handoff, u.external_id, c.user_id, c.current_stage_id, coalesce(s.name, '')
  FROM conversations c
  JOIN users u ON u.business_id = c.business_id AND u.id = c.user_id
  LEFT JOIN stages s ON s.business_id = c.business_id AND s.id = c.current_stage_id
 WHERE c.business_id = $1 AND c.id = $2";

/// An agent's answer already stored under key `$3` for the user (row `$2`), and its
/// conversation (the key is unique per user).
pub const AGENT_STORED: &str = "\
SELECT id, conversation_id FROM messages
 WHERE business_id = $1 AND user_id = $2 AND role = 'agent' AND idempotency_key = $3";

/// The conversation changed by an agent's answer: room for its message (`$3`: 1 or 0), the
/// handoff answered or ended (`$4`); an ended handoff in a handoff stage (`$6`) goes back to
/// stage `$5`.
pub const ANSWERED: &str = "\
UPDATE conversations
   SET version = version + 1, last_seq = last_seq + $3, updated_at = now(),
       handoff = CASE WHEN $4 THEN NULL ELSE handoff || '{\"answered\": true}'::jsonb END,
       current_stage_id = CASE WHEN $4 AND current_stage_id = ANY($6::uuid[]) THEN $5
                               ELSE current_stage_id END
 WHERE business_id = $1 AND id = $2 AND handoff IS NOT NULL
RETURNING last_seq";

/// A message of the conversation written outside the pipeline (`$3` id, `$4` role, `$5` text,
/// `$6` key, `$7` status, `$8` seq, `$9` user row, `$10` stage, `$11` metadata).
pub const MESSAGE: &str = "\
INSERT INTO messages (id, business_id, conversation_id, seq, role, content, idempotency_key,
                      stage_id, status, log_id, user_id, metadata)
VALUES ($3, $1, $2, $8, $4, $5, $6, $10, $7, $3, $9, $11)";

/// A handoff nobody answered, timed out (`$3`: now, in unix ms, past its `due_ms`; `$4` the
/// timeout reply's message id).
pub const TIMED_OUT: &str = "\
UPDATE conversations
   SET handoff = handoff || jsonb_build_object('timed_out', true, 'timeout_reply_id', $4::text),
       version = version + 1, last_seq = last_seq + 1, updated_at = now()
 WHERE business_id = $1 AND id = $2 AND handoff IS NOT NULL AND (handoff ->> 'answered') IS NULL
   AND (handoff ->> 'timed_out') IS NULL AND (handoff ->> 'due_ms')::bigint < $3
RETURNING last_seq, handoff ->> 'since_ms'";

/// A handoff started (`$3`) when none is under way.
pub const START: &str = "\
UPDATE conversations SET handoff = $3, version = version + 1, updated_at = now()
 WHERE business_id = $1 AND id = $2 AND handoff IS NULL
RETURNING id";

/// A handoff ended; a conversation in a handoff stage (`$4`) goes back to stage `$3`.
pub const END: &str = "\
UPDATE conversations SET handoff = NULL, version = version + 1, updated_at = now(),
       current_stage_id = CASE WHEN current_stage_id = ANY($4::uuid[]) THEN $3
                               ELSE current_stage_id END
 WHERE business_id = $1 AND id = $2 AND handoff IS NOT NULL
RETURNING id";

/// A conversation in handoff as an operator sees it (`icmp handoff list`).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct HandoffRow {
    pub business_id: Uuid,
    pub conversation_id: Uuid,
    pub user_id: String,
    pub stage: String,
    pub handoff: HandoffState,
}

struct Found {
    handoff: Option<HandoffState>,
    user: UserAddress,
    user_row: Uuid,
    stage_id: Uuid,
}

async fn find(
    tx: &deadpool_postgres::Transaction<'_>,
    stmt: &tokio_postgres::Statement,
    business_id: Uuid,
    conversation_id: Uuid,
) -> Result<Option<Found>, StoreError> {
    Ok(tx
        .query_opt(stmt, &[&business_id, &conversation_id])
        .await?
        .map(|r| {
            let handoff: Option<HandoffState> = r
                .get::<_, Option<Json<serde_json::Value>>>(0)
                .and_then(|j| serde_json::from_value(j.0).ok());
            Found {
                user: UserAddress {
                    user_id: r.get(1),
                    reply_to: handoff.as_ref().and_then(|h| h.reply_to.clone()),
                    stage: r.get(4),
                },
                handoff,
                user_row: r.get(2),
                stage_id: r.get(3),
            }
        }))
}

impl Store {
    /// Stores an agent's answer as the conversation's next message (role `agent`), marks the
    /// handoff answered (or ends it), once per key: an answer stored before is found, not
    /// stored again.
    pub async fn agent_answer(&self, a: &AgentAnswer<'_>) -> Result<AgentStored, StoreError> {
        let mut client = self.client().await?;
        let stmts = (
            client.prepared(CONVERSATION).await?,
            client.prepared(AGENT_STORED).await?,
            client.prepared(ANSWERED).await?,
            client.prepared(MESSAGE).await?,
        );
        let tx = client.transaction().await?;
        tx.batch_execute(&super::scope_sql(a.business_id, None))
            .await?;
        let Some(found) = find(&tx, &stmts.0, a.business_id, a.conversation_id).await? else {
            return Ok(AgentStored::UnknownConversation);
        };
        if let Some(r) = tx
            .query_opt(&stmts.1, &[&a.business_id, &found.user_row, &a.key])
            .await?
        {
            if r.get::<_, Uuid>(1) != a.conversation_id {
                return Ok(AgentStored::KeyReused);
            }
            return Ok(AgentStored::Stored {
                row: Some(r.get(0)),
                to: found.user,
                duplicate: true,
            });
        }
        if found.handoff.is_none() {
            return Ok(AgentStored::NotActive);
        }
        let room = i64::from(!a.text.is_empty());
        let Some(r) = tx
            .query_opt(
                &stmts.2,
                &[
                    &a.business_id,
                    &a.conversation_id,
                    &room,
                    &a.end,
                    &a.back_to.stage,
                    &a.back_to.handoff_stages,
                ],
            )
            .await?
        else {
            return Ok(AgentStored::NotActive);
        };
        let row = if a.text.is_empty() {
            None
        } else {
            let id = Uuid::now_v7();
            let seq: i64 = r.get(0);
            let metadata = Json(serde_json::json!({ "agent_id": a.agent_id }));
            tx.execute(
                &stmts.3,
                &[
                    &a.business_id,
                    &a.conversation_id,
                    &id,
                    &"agent",
                    &a.text,
                    &a.key,
                    &"ok",
                    &seq,
                    &found.user_row,
                    &found.stage_id,
                    &metadata,
                ],
            )
            .await?;
            Some(id)
        };
        tx.commit().await?;
        Ok(AgentStored::Stored {
            row,
            to: found.user,
            duplicate: false,
        })
    }

    /// Stores the timeout reply of a handoff started before `before_ms` that no agent
    /// answered, and marks it timed out; `None` when it is not (any more) such a handoff.
    pub async fn time_out_handoff(
        &self,
        business_id: Uuid,
        conversation_id: Uuid,
        before_ms: i64,
        text: &str,
    ) -> Result<Option<(Uuid, UserAddress)>, StoreError> {
        let mut client = self.client().await?;
        let stmts = (
            client.prepared(CONVERSATION).await?,
            client.prepared(TIMED_OUT).await?,
            client.prepared(MESSAGE).await?,
        );
        let tx = client.transaction().await?;
        tx.batch_execute(&super::scope_sql(business_id, None))
            .await?;
        let Some(found) = find(&tx, &stmts.0, business_id, conversation_id).await? else {
            return Ok(None);
        };
        let id = Uuid::now_v7();
        let Some(r) = tx
            .query_opt(
                &stmts.1,
                &[&business_id, &conversation_id, &before_ms, &id.to_string()],
            )
            .await?
        else {
            return Ok(None);
        };
        let seq: i64 = r.get(0);
        let since: Option<String> = r.get(1);
        // A key no user message can take (the reply's id is made here).
        let key = format!("handoff-timeout:{}:{id}", since.unwrap_or_default());
        let metadata: Option<Json<serde_json::Value>> = None;
        tx.execute(
            &stmts.2,
            &[
                &business_id,
                &conversation_id,
                &id,
                &"assistant",
                &text,
                &key,
                &"handoff_timeout",
                &seq,
                &found.user_row,
                &found.stage_id,
                &metadata,
            ],
        )
        .await?;
        tx.commit().await?;
        Ok(Some((id, found.user)))
    }

    /// A conversation's handoff, its user and the text of its timeout reply when one is
    /// stored (for the sweep that publishes a stored timeout reply).
    pub async fn handoff_of(
        &self,
        business_id: Uuid,
        conversation_id: Uuid,
    ) -> Result<Option<(HandoffState, UserAddress, Option<String>)>, StoreError> {
        let client = self.client().await?;
        let stmt = client.prepared(CONVERSATION).await?;
        let rows = self
            .scoped(
                &client,
                business_id,
                &stmt,
                &[&business_id, &conversation_id],
            )
            .await?;
        let Some(r) = rows.first() else {
            return Ok(None);
        };
        let Some(handoff) = r
            .get::<_, Option<Json<serde_json::Value>>>(0)
            .and_then(|j| serde_json::from_value::<HandoffState>(j.0).ok())
        else {
            return Ok(None);
        };
        let user = UserAddress {
            user_id: r.get(1),
            reply_to: handoff.reply_to.clone(),
            stage: r.get(4),
        };
        let text = match handoff.timeout_reply_id {
            Some(id) => {
                let stmt = client
                    .prepared("SELECT content FROM messages WHERE business_id = $1 AND id = $2")
                    .await?;
                self.scoped(&client, business_id, &stmt, &[&business_id, &id])
                    .await?
                    .first()
                    .map(|r| r.get(0))
            }
            None => None,
        };
        Ok(Some((handoff, user, text)))
    }

    /// Marks that the agents were told a handoff (the one that started at `since_ms`) started
    /// (bookkeeping: the version stays).
    pub async fn handoff_told(
        &self,
        business_id: Uuid,
        conversation_id: Uuid,
        since_ms: i64,
    ) -> Result<(), StoreError> {
        let client = self.client().await?;
        let stmt = client
            .prepared(
                "UPDATE conversations SET handoff = handoff || '{\"told\": true}' \
                 WHERE business_id = $1 AND id = $2 AND (handoff ->> 'since_ms')::bigint = $3",
            )
            .await?;
        self.scoped(
            &client,
            business_id,
            &stmt,
            &[&business_id, &conversation_id, &since_ms],
        )
        .await?;
        Ok(())
    }

    /// Marks a handoff's timeout reply published (bookkeeping of the sweep: the version
    /// stays).
    pub async fn timeout_published(
        &self,
        business_id: Uuid,
        conversation_id: Uuid,
    ) -> Result<(), StoreError> {
        let client = self.client().await?;
        let stmt = client
            .prepared(
                "UPDATE conversations SET handoff = handoff || '{\"timeout_published\": true}' \
                 WHERE business_id = $1 AND id = $2 AND handoff IS NOT NULL",
            )
            .await?;
        self.scoped(
            &client,
            business_id,
            &stmt,
            &[&business_id, &conversation_id],
        )
        .await?;
        Ok(())
    }

    /// Up to `n` handoffs of every business that no agent answered, started before
    /// `before_ms`, and those whose timeout reply is not published yet: (business,
    /// conversation), the oldest first.
    pub async fn unanswered_handoffs(
        &self,
        n: i32,
        before_ms: i64,
    ) -> Result<Vec<(Uuid, Uuid)>, StoreError> {
        let client = self.client().await?;
        let stmt = client
            .prepared("SELECT business_id, id FROM icmp_unanswered_handoffs($1, $2)")
            .await?;
        Ok(client
            .query(&stmt, &[&n, &before_ms])
            .await?
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect())
    }

    /// Starts a handoff of a conversation not handed off; returns its user's id (`None`: no
    /// such conversation, or one already with a person).
    pub async fn start_handoff(
        &self,
        business_id: Uuid,
        conversation_id: Uuid,
        state: &HandoffState,
    ) -> Result<Option<String>, StoreError> {
        self.change_handoff(
            business_id,
            conversation_id,
            START,
            Some(Json(state)),
            &BackTo::default(),
        )
        .await
    }

    /// Ends a conversation's handoff (see [`BackTo`]); returns its user's id (`None`: no such
    /// conversation, or one not with a person).
    pub async fn end_handoff(
        &self,
        business_id: Uuid,
        conversation_id: Uuid,
        back_to: &BackTo,
    ) -> Result<Option<String>, StoreError> {
        self.change_handoff(business_id, conversation_id, END, None, back_to)
            .await
    }

    async fn change_handoff(
        &self,
        business_id: Uuid,
        conversation_id: Uuid,
        sql: &str,
        state: Option<Json<&HandoffState>>,
        back_to: &BackTo,
    ) -> Result<Option<String>, StoreError> {
        let mut client = self.client().await?;
        let stmts = (
            client.prepared(CONVERSATION).await?,
            client.prepared(sql).await?,
        );
        let tx = client.transaction().await?;
        tx.batch_execute(&super::scope_sql(business_id, None))
            .await?;
        let Some(found) = find(&tx, &stmts.0, business_id, conversation_id).await? else {
            return Ok(None);
        };
        let changed = match &state {
            Some(s) => {
                tx.query_opt(&stmts.1, &[&business_id, &conversation_id, s])
                    .await?
            }
            None => {
                tx.query_opt(
                    &stmts.1,
                    &[
                        &business_id,
                        &conversation_id,
                        &back_to.stage,
                        &back_to.handoff_stages,
                    ],
                )
                .await?
            }
        };
        if changed.is_none() {
            return Ok(None);
        }
        tx.commit().await?;
        Ok(Some(found.user.user_id))
    }

    /// The business of a conversation (an operator's read, as the tables' owner).
    pub async fn business_of_conversation(
        &self,
        conversation_id: Uuid,
    ) -> Result<Option<Uuid>, StoreError> {
        let client = self.client().await?;
        Ok(client
            .query_opt(
                "SELECT business_id FROM conversations WHERE id = $1",
                &[&conversation_id],
            )
            .await?
            .map(|r| r.get(0)))
    }

    /// The conversations with a person, the oldest handoff first (an operator's read, as the
    /// tables' owner).
    pub async fn list_handoffs(
        &self,
        business: Option<Uuid>,
    ) -> Result<Vec<HandoffRow>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT c.business_id, c.id, u.external_id, coalesce(s.name, ''), c.handoff \
                 FROM conversations c \
                 JOIN users u ON u.business_id = c.business_id AND u.id = c.user_id \
                 LEFT JOIN stages s ON s.business_id = c.business_id AND s.id = c.current_stage_id \
                 WHERE c.handoff IS NOT NULL AND ($1::uuid IS NULL OR c.business_id = $1) \
                 ORDER BY (c.handoff ->> 'since_ms')::bigint LIMIT 500",
                &[&business],
            )
            .await?;
        Ok(rows
            .iter()
            .filter_map(|r| {
                let handoff =
                    serde_json::from_value(r.get::<_, Json<serde_json::Value>>(4).0).ok()?;
                Some(HandoffRow {
                    business_id: r.get(0),
                    conversation_id: r.get(1),
                    user_id: r.get(2),
                    stage: r.get(3),
                    handoff,
                })
            })
            .collect())
    }
}
