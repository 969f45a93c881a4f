//! The event feed: every outcome, card masked, as JSON on `{prefix}.events.{node}` in the
//! stream `PAYSWITCH_EVENTS`, for the systems around the switch (CRM, accounting, BI).
//!
//! The feed is made from the journal, not beside it: each node follows its own journal
//! subject on the journal stream and publishes one event per answer recorded there
//! (`response`, a stand-in's `advice_queued`, a request shed at the door), in journal
//! order, each with `Nats-Msg-Id: {node}:{journal sequence}` and the journal's position in
//! its headers. So an event exists for every answer the journal holds and for no other,
//! never twice within the stream's duplicate window; publishing is off the request's
//! path; and a node that restarts resumes after the last event it published. A survivor
//! that takes a node over publishes the events that node had not.
//!
//! Consumers read the stream with a durable consumer of their own and acknowledge what
//! they have processed: restarted, they resume where they stopped (README, "The event
//! feed").

use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream::{self, consumer};
use futures_util::StreamExt;
use serde::Serialize;

use super::ClusterConfig;
use crate::journal::{Record, RecordKind};

/// The event stream.
pub const EVENTS_STREAM: &str = "PAYSWITCH_EVENTS";

/// Header: the journal sequence number of the record an event was made from.
pub const JOURNAL_SEQ_HEADER: &str = "Payswitch-Journal-Seq";

/// Header: the journal stream's sequence number of the message that record was in (where
/// a resumed feed starts reading).
pub const STREAM_SEQ_HEADER: &str = "Payswitch-Stream-Seq";

/// How long events are kept: consumers that stop for longer lose the oldest.
pub const EVENTS_MAX_AGE: Duration = Duration::from_secs(7 * 86_400);

/// Events published and not yet acknowledged by the stream, at most.
const MAX_EVENTS_IN_FLIGHT: usize = 512;

/// One outcome, as the feed carries it. Field names are the README's schema.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Event<'a> {
    /// Schema version.
    pub v: u8,
    /// The node that answered.
    pub node: &'a str,
    /// The journal sequence number of the answer's record on that node.
    pub seq: u64,
    /// When the answer was recorded, Unix milliseconds.
    pub time_ms: i64,
    /// `authorization`, `reversal` (a gateway's 0400/0420) or `advice`.
    pub kind: &'static str,
    /// The request's MTI.
    pub mti: &'a str,
    /// Card acceptor terminal (41).
    pub terminal: &'a str,
    /// Merchant (42).
    pub merchant: &'a str,
    /// The gateway's STAN (11).
    pub stan: &'a str,
    /// Retrieval reference number (37).
    pub rrn: &'a str,
    /// Transmission time (7), `MMDDhhmmss`.
    pub transmission_time: &'a str,
    /// The card, masked: first six and last four digits.
    pub pan_masked: &'a str,
    /// Amount, minor units.
    pub amount_minor: u64,
    /// Currency, ISO 4217 numeric.
    pub currency: u16,
    /// Response code given to the gateway (39).
    pub code: &'a str,
    /// Approval code (38), when approved.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub approval_code: Option<&'a str>,
    /// Fraud decision (`approve`, `review`, `decline`), when scored.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub decision: Option<&'a str>,
    /// The champion's score, when scored.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub score: Option<f32>,
    /// The acquirer that answered, if one did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub acquirer: Option<&'a str>,
    /// Approved in stand-in (no acquirer reachable).
    pub stand_in: bool,
    /// A retransmission answered from its original.
    pub duplicate: bool,
    /// Field 48 as sent.
    pub private_data: &'a str,
}

/// The event of journal record `seq` of `node`, if the record is an answer.
pub fn event<'a>(node: &'a str, seq: u64, r: &'a Record) -> Option<Event<'a>> {
    let answered = match r.kind {
        RecordKind::Response | RecordKind::AdviceQueued => true,
        // A request shed at the door carries its answer itself.
        RecordKind::Request => !r.code.is_empty(),
        _ => false,
    };
    if !answered {
        return None;
    }
    let text = |s: &'a str| (!s.is_empty()).then_some(s);
    let kind = match r.mti.as_str() {
        "0400" | "0401" | "0420" | "0421" => "reversal",
        "0120" | "0121" | "0220" | "0221" => "advice",
        _ => "authorization",
    };
    Some(Event {
        v: 1,
        node,
        seq,
        time_ms: r.time_ms,
        kind,
        mti: &r.mti,
        terminal: &r.terminal,
        merchant: &r.merchant,
        stan: &r.stan,
        rrn: &r.rrn,
        transmission_time: &r.transmission_time,
        pan_masked: &r.pan_masked,
        amount_minor: r.amount_minor,
        currency: r.currency,
        code: &r.code,
        approval_code: text(&r.approval_code),
        decision: text(&r.decision),
        score: r.score,
        acquirer: text(&r.acquirer),
        stand_in: r.kind == RecordKind::AdviceQueued,
        duplicate: r.duplicate,
        private_data: &r.private_data,
    })
}

/// The event subject of `node`.
pub fn subject(config: &ClusterConfig, node: &str) -> String {
    format!("{}.events.{node}", config.subject_prefix)
}

/// The event stream, created when missing.
pub async fn stream(context: &jetstream::Context, config: &ClusterConfig) -> anyhow::Result<()> {
    let subjects = format!("{}.events.>", config.subject_prefix);
    let created = context
        .get_or_create_stream(jetstream::stream::Config {
            name: EVENTS_STREAM.into(),
            subjects: vec![subjects.clone()],
            num_replicas: config.replicas,
            storage: jetstream::stream::StorageType::File,
            max_age: EVENTS_MAX_AGE,
            duplicate_window: Duration::from_secs(120),
            ..Default::default()
        })
        .await
        .with_context(|| format!("getting or creating the stream {EVENTS_STREAM}"))?;
    anyhow::ensure!(
        created.cached_info().config.subjects.contains(&subjects),
        "the stream {EVENTS_STREAM} exists for other subjects"
    );
    Ok(())
}

/// Where `node`'s feed stopped: the journal sequence of its last event and the journal
/// stream's sequence of the message it came from (0, 0: none yet).
async fn resume_point(
    context: &jetstream::Context,
    config: &ClusterConfig,
    node: &str,
) -> anyhow::Result<(u64, u64)> {
    let events = context.get_stream(EVENTS_STREAM).await?;
    match events
        .get_last_raw_message_by_subject(&subject(config, node))
        .await
    {
        Ok(last) => {
            let header = |name: &str| {
                last.headers
                    .get(name)
                    .and_then(|v| v.as_str().parse::<u64>().ok())
                    .unwrap_or(0)
            };
            Ok((header(JOURNAL_SEQ_HEADER), header(STREAM_SEQ_HEADER)))
        }
        Err(e) if e.kind() == jetstream::stream::LastRawMessageErrorKind::NoMessageFound => {
            Ok((0, 0))
        }
        Err(e) => Err(e.into()),
    }
}

/// Publishes `node`'s events from where its feed stopped. `follow`: keep following its
/// journal as it grows (the node's own feed); otherwise stop at the end of what the
/// journal stream holds now (a survivor catching up a dead node's feed). Returns the
/// events published.
pub async fn publish(
    context: &jetstream::Context,
    config: &ClusterConfig,
    node: &str,
    follow: bool,
) -> anyhow::Result<u64> {
    let (after_seq, from_stream_seq) = resume_point(context, config, node).await?;
    let journal = context.get_stream(&config.stream).await?;
    let journal_subject = config.journal_subject_of(node);
    let last = if follow {
        u64::MAX
    } else {
        match journal
            .get_last_raw_message_by_subject(&journal_subject)
            .await
        {
            Ok(m) => m.sequence,
            Err(e) if e.kind() == jetstream::stream::LastRawMessageErrorKind::NoMessageFound => {
                return Ok(0)
            }
            Err(e) => return Err(e.into()),
        }
    };
    let deliver_policy = if from_stream_seq > 0 {
        consumer::DeliverPolicy::ByStartSequence {
            start_sequence: from_stream_seq,
        }
    } else {
        consumer::DeliverPolicy::All
    };
    let reader = journal
        .create_consumer(consumer::pull::OrderedConfig {
            filter_subject: journal_subject.clone(),
            deliver_policy,
            ..Default::default()
        })
        .await?;
    let mut messages = reader.messages().await?;
    let subject = subject(config, node);
    let mut acks = std::collections::VecDeque::new();
    let mut published = 0;
    while let Some(message) = messages.next().await {
        let message = message?;
        let stream_seq = message
            .info()
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .stream_sequence;
        let mut failed = None;
        let mut outgoing = Vec::new();
        super::frames(&message.payload, |seq, record| {
            if seq <= after_seq {
                return;
            }
            if let Some(event) = event(node, seq, &record) {
                match serde_json::to_vec(&event) {
                    Ok(json) => outgoing.push((seq, json)),
                    Err(e) => failed = Some(e.to_string()),
                }
            }
        })
        .map_err(|e| anyhow::anyhow!("{journal_subject}, stream message {stream_seq}: {e}"))?;
        if let Some(e) = failed {
            anyhow::bail!("an event did not serialize: {e}");
        }
        for (seq, json) in outgoing {
            let mut headers = async_nats::HeaderMap::new();
            headers.insert("Nats-Msg-Id", format!("{node}:{seq}").as_str());
            headers.insert(JOURNAL_SEQ_HEADER, seq.to_string().as_str());
            headers.insert(STREAM_SEQ_HEADER, stream_seq.to_string().as_str());
            let ack = context
                .publish_with_headers(subject.clone(), headers, json.into())
                .await?;
            acks.push_back(ack);
            published += 1;
            while acks.len() >= MAX_EVENTS_IN_FLIGHT {
                if let Some(ack) = acks.pop_front() {
                    ack.await?;
                }
            }
        }
        if stream_seq >= last {
            break;
        }
    }
    for ack in acks {
        ack.await?;
    }
    Ok(published)
}

/// The node's own feed, until `shutdown`: restarted a second after any failure (a
/// server out of reach), from where it stopped.
pub async fn run(
    context: jetstream::Context,
    config: ClusterConfig,
    shutdown: tokio_util::sync::CancellationToken,
) {
    loop {
        let result = tokio::select! {
            _ = shutdown.cancelled() => return,
            result = publish(&context, &config, &config.node, true) => result,
        };
        if let Err(e) = result {
            tracing::warn!(error = %e, "event feed interrupted; resuming in 1 s");
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_per_answer_card_masked() {
        let response = Record {
            kind: RecordKind::Response,
            time_ms: 5,
            mti: "0100".into(),
            terminal: "TERM0001".into(),
            stan: "000001".into(),
            rrn: "000000000001".into(),
            pan_masked: "411111******1111".into(),
            pan_hash: 77,
            amount_minor: 1250,
            currency: 840,
            code: "00".into(),
            approval_code: "A1B2C3".into(),
            decision: "approve".into(),
            acquirer: "north".into(),
            ..Record::default()
        };
        let event = event("a", 9, &response).unwrap();
        let json = serde_json::to_value(&event).unwrap();
        assert_eq!(json["kind"], "authorization");
        assert_eq!(json["code"], "00");
        assert_eq!(json["pan_masked"], "411111******1111");
        assert_eq!(json["seq"], 9);
        assert!(
            json.get("pan_hash").is_none(),
            "no card key material either"
        );
        let forwarded = Record {
            kind: RecordKind::Forwarded,
            ..response.clone()
        };
        assert!(super::event("a", 8, &forwarded).is_none(), "not an answer");
        let shed = Record {
            kind: RecordKind::Request,
            code: "91".into(),
            ..response
        };
        assert_eq!(super::event("a", 7, &shed).unwrap().code, "91");
    }
}
