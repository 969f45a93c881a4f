//! The life of one request, as a state machine that performs no I/O and reads no clock.
//!
//! A [`Lifecycle`] is made when a validated request has its shard's verdict (or was
//! refused before its shard). The driver then alternates: the lifecycle says what to do
//! next ([`Step`]), the driver does it and hands back what happened ([`Event`]) with the
//! time, until the step is [`Step::Reply`]. Every step is answered by exactly one event;
//! the lifecycle asserts that it got the kind of event its step asked for.
//!
//! What the lifecycle decides, and nothing else does:
//! - **durable before it leaves**: a request is sent to an acquirer only once its
//!   `forwarded` record (with the STAN it carries there) is durable;
//! - **durable before the answer**: the gateway hears an answer only once its `response`
//!   record is durable (or the journal has failed, in which case nothing is authorized);
//! - **never twice**: an acquirer that may have received a request (timeout, lost
//!   connection) is never followed by another; the request is reversed instead, and one
//!   original is reversed at most once, whoever asks first (a timeout or the gateway's
//!   own 0400);
//! - **retransmissions** are answered from their original, waiting for it if it is out;
//! - **stand-in** only when no acquirer was sent the request: its route's rule may then
//!   approve it, journaled with the advice owed to the route's first acquirer before the
//!   answer leaves.
//!
//! Two drivers carry the steps out: the switch's async one (`crate::switch`) over real
//! sockets, the journal writer and tokio timers, and the simulator's (`crate::sim`) on a
//! simulated clock, network and disk.

use std::sync::Arc;

use payswitch_protocol::{fields, Message, ResponseCode, Stan};

pub use crate::clock::Now;

use crate::ingress::validate::{self, as_code, Authorization};
use crate::journal::{JournalError, Record, RecordKind};
use crate::reversal::{Owed, PendingReversal};
use crate::routing::{AcquirerIndex, StandIn};
use crate::shard::duplicates::{Forwarded, Original, Outcome};
use crate::shard::ShardVerdict;
use payswitch_models::model::Decision;

/// What the driver must do next.
// Moved once per step, and handed on by value: boxing the reply or the reversal would
// cost an allocation each.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Step {
    /// Append these records contiguously and wait until they are durable; answer
    /// [`Event::Durable`].
    Append(Vec<Record>),
    /// Take a place and a STAN on this acquirer's link, sending nothing; answer
    /// [`Event::Reserved`], or [`Event::Unavailable`] when the acquirer is drained, down
    /// or at its in-flight limit.
    Reserve(AcquirerIndex),
    /// Send the request on the place reserved, with the reserved STAN in field 11, and
    /// wait for the answer (up to the link's timeout); answer [`Event::Answered`],
    /// [`Event::NotSent`] or [`Event::NoAnswer`].
    Send {
        /// The acquirer reserved.
        acquirer: AcquirerIndex,
        /// The STAN reserved.
        stan: Stan,
    },
    /// Hand this reversal (or a stand-in approval's advice), already journaled as queued
    /// (or not journaled when the journal has failed), to the store-and-forward queue;
    /// answer [`Event::Queued`].
    QueueReversal(PendingReversal),
    /// Wait for this original's outcome (up to [`DUPLICATE_WAIT_MS`]); answer
    /// [`Event::Original`].
    AwaitOriginal(Arc<Original>),
    /// In a cluster: claim the request's duplicate key for this node
    /// (`cluster::claims`) before deciding it; if another node claimed it, wait for its
    /// answer (up to [`DUPLICATE_WAIT_MS`]). Answer [`Event::Claimed`].
    Claim,
    /// Send this answer to the gateway. The lifecycle is over.
    Reply(Reply),
}

/// What happened, in answer to the last [`Step`].
// Moved once per step: boxing the acquirer's answer would cost an allocation each.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Event {
    /// The appended records are durable; the first one's sequence number (0 without a
    /// journal). Or why they are not.
    Durable(Result<u64, JournalError>),
    /// A place on the link, and the STAN the request will carry there.
    Reserved(Stan),
    /// No place on that acquirer: drained, down or full. Nothing was sent.
    Unavailable,
    /// The acquirer's answer.
    Answered(Message),
    /// The link went down before the request left: nothing was sent.
    NotSent,
    /// The node lost its lease (`crate::fence`) before the request left: nothing was
    /// sent, and nothing is tried in its place (another acquirer, stand-in).
    Fenced,
    /// Sent, and no answer in time (or the connection was lost): the acquirer may have
    /// authorized it.
    NoAnswer,
    /// The reversal is in the store-and-forward queue.
    Queued,
    /// The original's outcome, or `None` if it did not come within the wait.
    Original(Option<Outcome>),
    /// What claiming the request found.
    Claimed(Claim),
}

/// What claiming a request across the cluster found ([`Step::Claim`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// This node decides it.
    Won,
    /// Another node decides it: its answer, or `None` if none came within the wait.
    Theirs(Option<Outcome>),
    /// The claim could not be made (no NATS server, or the node's lease is not held):
    /// nothing is decided, the gateway is answered 91.
    Failed,
}

impl Event {
    fn name(&self) -> &'static str {
        match self {
            Event::Durable(_) => "Durable",
            Event::Reserved(_) => "Reserved",
            Event::Unavailable => "Unavailable",
            Event::Answered(_) => "Answered",
            Event::NotSent => "NotSent",
            Event::Fenced => "Fenced",
            Event::NoAnswer => "NoAnswer",
            Event::Queued => "Queued",
            Event::Original(_) => "Original",
            Event::Claimed(_) => "Claimed",
        }
    }
}

/// The answer for the gateway.
#[derive(Debug)]
pub struct Reply {
    /// Response code (39).
    pub code: [u8; 2],
    /// The response message.
    pub response: Message,
}

/// How long a retransmission waits for its original's answer: longer than any acquirer
/// timeout, so it only runs out if the original's task is gone.
pub const DUPLICATE_WAIT_MS: u64 = 30_000;

/// What one request added to the switch's counters.
#[derive(Debug, Default, Clone, Copy)]
pub struct Counts {
    /// Answered without authorizing because the journal could not take it.
    pub journal_refused: bool,
    /// A retransmission answered from its original.
    pub duplicate: bool,
    /// Reversals this request queued (0 or 1).
    pub reversals_queued: u8,
    /// Approved in stand-in: no acquirer could take it; its advice is queued.
    pub stand_in_approved: bool,
    /// No acquirer could take it and its route's stand-in rule did not admit it (91).
    pub stand_in_refused: bool,
}

/// An answer on its way: code, approval and field 48.
#[derive(Debug, Clone)]
struct Answer {
    code: [u8; 2],
    approval: Option<[u8; 6]>,
    private_data: String,
}

impl Answer {
    fn new(code: ResponseCode, private_data: String) -> Answer {
        Answer {
            code: as_code(code),
            approval: None,
            private_data,
        }
    }

    fn outcome(&self) -> Outcome {
        Outcome {
            code: self.code,
            approval: self.approval,
            private_data: self.private_data.clone(),
        }
    }

    fn approved(&self) -> bool {
        self.code == *b"00"
    }
}

/// Where an authorization is on its route.
#[derive(Debug)]
struct Routing {
    tags: String,
    route: Arc<[AcquirerIndex]>,
    /// Position in `route` of the acquirer being tried.
    position: usize,
    original: Arc<Original>,
    /// The route's stand-in rule, and whether the fraud decision was `approve`.
    stand_in: Option<StandIn>,
    approved: bool,
}

impl Routing {
    fn acquirer(&self) -> AcquirerIndex {
        self.route[self.position]
    }
}

/// A new authorization as its shard decided it.
#[derive(Debug)]
struct Fresh {
    scoring: crate::scoring::Verdict,
    route: Option<crate::routing::Route>,
    original: Arc<Original>,
    transaction: payswitch_models::features::Transaction,
}

/// What the lifecycle waits for.
#[derive(Debug)]
enum State {
    /// The shard's verdict is in; nothing asked yet.
    Start(ShardVerdict),
    /// Refused before its shard (full queue): answer with this code.
    Refused(ResponseCode),
    /// [`Step::Reserve`] sent for `routing.acquirer()`.
    Reserving(Routing),
    /// [`Step::Append`] of the `forwarded` record sent.
    JournalingForward {
        routing: Routing,
        stan: Stan,
        forwarded: Record,
    },
    /// [`Step::Send`] sent; `since`: when.
    Sending { routing: Routing, since: Now },
    /// [`Step::Append`] of a `reversal_queued` record sent; then queue it and answer.
    JournalingReversal {
        pending: PendingReversal,
        then: Answer,
        original: Option<Arc<Original>>,
    },
    /// [`Step::QueueReversal`] sent; then answer.
    QueueingReversal {
        then: Answer,
        original: Option<Arc<Original>>,
    },
    /// [`Step::Append`] of the `response` record sent.
    JournalingResponse {
        answer: Answer,
        original: Option<Arc<Original>>,
    },
    /// The journal refused the response of an approval: its reversal was handed over
    /// ([`Step::QueueReversal`]); then answer this.
    QueueingUnjournaled(Answer),
    /// [`Step::Append`] of a stand-in approval's `response` and `advice_queued` records
    /// sent, the advice to `acquirer`.
    JournalingStandIn {
        answer: Answer,
        original: Arc<Original>,
        acquirer: AcquirerIndex,
        advice: Record,
    },
    /// The stand-in approval's advice was handed over ([`Step::QueueReversal`]); then
    /// answer.
    QueueingAdvice {
        answer: Answer,
        original: Arc<Original>,
    },
    /// [`Step::AwaitOriginal`] sent.
    AwaitingOriginal,
    /// [`Step::Claim`] sent for a new authorization, decided once claimed.
    Claiming(Fresh),
    /// [`Step::Append`] of a duplicate's `response` record sent; the request's own entry
    /// in the window, when it has one, gets the same answer.
    JournalingDuplicate(Outcome, Option<Arc<Original>>),
    /// Replied.
    Done,
}

/// One request's life, from the shard's verdict to the reply.
#[derive(Debug)]
pub struct Lifecycle {
    request: Message,
    /// The request's journal record; it goes out with the first of its follow-ups, so the
    /// common paths cost one group commit each.
    record: Record,
    /// Sequence number of the request record once journaled; 0 before.
    request_seq: u64,
    /// An append failed: nothing more is journaled for this request.
    journal_failed: bool,
    received: Now,
    /// When the outstanding append was asked for.
    append_since: Option<Now>,
    journal_us: u64,
    /// The acquirer that answered (or did not) and its round trip.
    acquirer: Option<(AcquirerIndex, u64)>,
    counts: Counts,
    state: State,
    /// In a cluster: new authorizations are claimed across it before they are decided.
    claims: bool,
    /// The fencing token of the node's lease when the request was taken in, in a
    /// cluster (`crate::fence`): what it sends and owes belongs to that lease.
    token: u64,
}

impl Lifecycle {
    /// The record of a validated request.
    pub fn request_record(
        request: &Message,
        auth: &Authorization,
        pan_hash: u128,
        now: Now,
    ) -> Record {
        let text = |n| request.get_str(n).unwrap_or("").to_string();
        Record {
            kind: RecordKind::Request,
            time_ms: now.unix_ms(),
            mti: request.mti().as_str().to_string(),
            processing_code: text(fields::PROCESSING_CODE),
            transmission_time: text(fields::TRANSMISSION_TIME),
            stan: text(fields::STAN),
            rrn: text(fields::RRN),
            terminal: text(fields::TERMINAL),
            merchant: text(fields::MERCHANT),
            pan_masked: auth.pan.to_string(),
            pan_hash,
            amount_minor: auth.amount.get(),
            currency: auth.currency.get(),
            ..Record::default()
        }
    }

    /// A request with its shard's verdict. `record` is its [`Lifecycle::request_record`];
    /// `received`: when the switch read it.
    pub fn new(request: Message, record: Record, received: Now, verdict: ShardVerdict) -> Self {
        Lifecycle::with_state(request, record, received, State::Start(verdict))
    }

    /// A request refused before its shard (its queue was full): journaled with its
    /// answer, `code`, then answered.
    pub fn refused(request: Message, record: Record, received: Now, code: ResponseCode) -> Self {
        Lifecycle::with_state(request, record, received, State::Refused(code))
    }

    fn with_state(request: Message, record: Record, received: Now, state: State) -> Self {
        Lifecycle {
            request,
            record,
            request_seq: 0,
            journal_failed: false,
            received,
            append_since: None,
            journal_us: 0,
            acquirer: None,
            counts: Counts::default(),
            state,
            claims: false,
            token: 0,
        }
    }

    /// New authorizations are claimed across the cluster ([`Step::Claim`]) before they
    /// are decided.
    pub fn with_claims(mut self) -> Self {
        self.claims = true;
        self
    }

    /// Taken in under the lease with fencing token `token` (`crate::fence`).
    pub fn with_token(mut self, token: u64) -> Self {
        self.token = token;
        self
    }

    /// The fencing token it was taken in under.
    pub fn token(&self) -> u64 {
        self.token
    }

    /// The request.
    pub fn request(&self) -> &Message {
        &self.request
    }

    /// The first step. `acquirers` are the acquirers' names, by index.
    pub fn start(&mut self, now: Now, acquirers: &[String]) -> Step {
        match std::mem::replace(&mut self.state, State::Done) {
            State::Start(verdict) => self.on_verdict(verdict, now, acquirers),
            State::Refused(code) => {
                self.finish(Answer::new(code, String::new()), None, now, acquirers)
            }
            state => panic!("lifecycle started twice (in {state:?})"),
        }
    }

    /// What happened in answer to the last step; returns the next step.
    ///
    /// # Panics
    /// When `event` does not answer the last step: a driver bug.
    pub fn handle(&mut self, event: Event, now: Now, acquirers: &[String]) -> Step {
        if let Event::Durable(_) = &event {
            let since = self
                .append_since
                .take()
                .expect("Durable answers an Append step");
            self.journal_us = self.journal_us.saturating_add(now.since(since));
        }
        match (std::mem::replace(&mut self.state, State::Done), event) {
            (State::Reserving(routing), Event::Unavailable) => {
                self.next_acquirer(routing, now, acquirers)
            }
            (State::Reserving(routing), Event::Reserved(stan)) => {
                self.on_reserved(routing, stan, now, acquirers)
            }
            (
                State::JournalingForward {
                    routing,
                    stan,
                    forwarded,
                },
                Event::Durable(durable),
            ) => self.on_forward_durable(routing, stan, forwarded, durable, now, acquirers),
            (State::Sending { routing, .. }, Event::Fenced) => {
                let tags = with_tag(routing.tags, "fenced=1");
                let answer = Answer::new(ResponseCode::IssuerInoperative, tags);
                self.finish(answer, Some(routing.original), now, acquirers)
            }
            (State::Sending { routing, since }, event) => {
                self.on_sent(routing, since, event, now, acquirers)
            }
            (
                State::JournalingReversal {
                    pending,
                    then,
                    original,
                },
                Event::Durable(durable),
            ) => {
                let mut pending = pending;
                if self.durable(durable).is_err() {
                    tracing::error!(rrn = %pending.original.rrn, "reversal could not be journaled: delivering it from memory");
                } else {
                    pending.journaled = true;
                }
                self.counts.reversals_queued += 1;
                self.state = State::QueueingReversal { then, original };
                Step::QueueReversal(pending)
            }
            (State::QueueingReversal { then, original }, Event::Queued) => {
                self.finish(then, original, now, acquirers)
            }
            (State::JournalingResponse { answer, original }, Event::Durable(durable)) => {
                self.on_response_durable(answer, original, durable, acquirers)
            }
            (State::QueueingUnjournaled(answer), Event::Queued) => self.reply(answer, None),
            (
                State::JournalingStandIn {
                    answer,
                    original,
                    acquirer,
                    advice,
                },
                Event::Durable(durable),
            ) => self.on_stand_in_durable(answer, original, acquirer, advice, durable),
            (State::QueueingAdvice { answer, original }, Event::Queued) => {
                self.reply(answer, Some(&original))
            }
            (State::AwaitingOriginal, Event::Original(outcome)) => self.on_original(outcome, now),
            (State::JournalingDuplicate(outcome, own), Event::Durable(durable)) => {
                self.on_duplicate_durable(outcome, own, durable)
            }
            (State::Claiming(fresh), Event::Claimed(claim)) => {
                self.on_claimed(fresh, claim, now, acquirers)
            }
            (state, event) => unexpected(state_name(&state), &event),
        }
    }

    /// A place on the acquirer's link: journal where the request goes before it goes.
    fn on_reserved(
        &mut self,
        routing: Routing,
        stan: Stan,
        now: Now,
        acquirers: &[String],
    ) -> Step {
        let mut forwarded = self.follow_up(RecordKind::Forwarded, now);
        forwarded.acquirer = acquirers[routing.acquirer()].clone();
        forwarded.link_stan = stan.get();
        let step = self.append(vec![forwarded.clone()], now);
        self.state = State::JournalingForward {
            routing,
            stan,
            forwarded,
        };
        step
    }

    /// The `forwarded` record is durable (send) or could not be (answer, nothing sent).
    fn on_forward_durable(
        &mut self,
        routing: Routing,
        stan: Stan,
        mut forwarded: Record,
        durable: Result<u64, JournalError>,
        now: Now,
        acquirers: &[String],
    ) -> Step {
        if let Err(e) = self.durable(durable) {
            // Not durable, so not sent: nothing to reverse.
            self.counts.journal_refused = true;
            let answer = Answer::new(journal_refusal(e), routing.tags);
            return self.finish(answer, Some(routing.original), now, acquirers);
        }
        assert!(
            self.request_seq > 0,
            "the request record is durable before its forwarded record is used"
        );
        forwarded.request_seq = self.request_seq;
        forwarded.request_back = 0;
        let acquirer = routing.acquirer();
        let mut sent = Forwarded::new(acquirer, stan, self.request_seq, &forwarded);
        sent.token = self.token;
        routing.original.set_forwarded(sent);
        self.state = State::Sending {
            routing,
            since: now,
        };
        Step::Send { acquirer, stan }
    }

    /// What became of the send: an answer to relay, nothing sent (the next acquirer), or
    /// silence (91, and a reversal: it may have been authorized there).
    fn on_sent(
        &mut self,
        routing: Routing,
        since: Now,
        event: Event,
        now: Now,
        acquirers: &[String],
    ) -> Step {
        let acquirer = routing.acquirer();
        self.acquirer = Some((acquirer, now.since(since)));
        match event {
            Event::Answered(answer) => {
                let tags = with_acquirer(routing.tags, &acquirers[acquirer]);
                let answer = relay(&answer, tags);
                self.finish(answer, Some(routing.original), now, acquirers)
            }
            Event::NotSent => self.next_acquirer(routing, now, acquirers),
            Event::NoAnswer => {
                // Never sent elsewhere: the first acquirer may have approved it.
                let tags = with_acquirer(routing.tags, &acquirers[acquirer]);
                let answer = Answer::new(ResponseCode::IssuerInoperative, tags);
                self.reverse_then(routing.original, answer, None, now, acquirers)
            }
            event => unexpected("Send", &event),
        }
    }

    /// The response record is durable (reply) or could not be made so.
    fn on_response_durable(
        &mut self,
        answer: Answer,
        original: Option<Arc<Original>>,
        durable: Result<u64, JournalError>,
        acquirers: &[String],
    ) -> Step {
        let Err(e) = self.durable(durable) else {
            if let Some(original) = &original {
                original.mark_settled();
            }
            return self.reply(answer, original.as_ref());
        };
        self.counts.journal_refused = true;
        let refusal = Answer::new(journal_refusal(e), String::new());
        // Approved at the acquirer, but the approval cannot be made durable: the gateway
        // is told it failed, and the acquirer gets a reversal.
        if answer.approved() {
            if let Some(pending) = original.as_ref().and_then(|o| claim(o, acquirers)) {
                self.counts.reversals_queued += 1;
                self.state = State::QueueingUnjournaled(refusal.clone());
                if let Some(original) = &original {
                    original.set_outcome(refusal.outcome());
                }
                return Step::QueueReversal(pending);
            }
        }
        self.reply(refusal, original.as_ref())
    }

    /// A retransmission's original answered (or the wait ran out): journal the answer
    /// it gets, marked `dup=1`.
    fn on_original(&mut self, outcome: Option<Outcome>, now: Now) -> Step {
        self.on_original_for(outcome, None, now)
    }

    /// As [`Lifecycle::on_original`]; `own`: the request's own window entry (a copy
    /// another node claimed first), answered the same.
    fn on_original_for(
        &mut self,
        outcome: Option<Outcome>,
        own: Option<Arc<Original>>,
        now: Now,
    ) -> Step {
        let outcome = outcome.unwrap_or(Outcome {
            code: as_code(ResponseCode::DuplicateTransmission),
            approval: None,
            private_data: String::new(),
        });
        let private_data = if outcome.private_data.is_empty() {
            "dup=1".to_string()
        } else {
            format!("{};dup=1", outcome.private_data)
        };
        let mut response = self.follow_up(RecordKind::Response, now);
        response.duplicate = true;
        response.code = code_str(&outcome.code);
        if let Some(approval) = &outcome.approval {
            response.approval_code = String::from_utf8_lossy(approval).into_owned();
        }
        response.private_data = private_data.clone();
        response.switch_us = now.since(self.received);
        let step = self.append(vec![response], now);
        if let Some(own) = &own {
            own.set_outcome(outcome.clone());
        }
        self.state = State::JournalingDuplicate(
            Outcome {
                private_data,
                ..outcome
            },
            own,
        );
        step
    }

    /// A retransmission's answer is durable (reply with it) or could not be made so.
    fn on_duplicate_durable(
        &mut self,
        outcome: Outcome,
        own: Option<Arc<Original>>,
        durable: Result<u64, JournalError>,
    ) -> Step {
        if let Err(e) = self.durable(durable) {
            self.counts.journal_refused = true;
            return self.reply(Answer::new(journal_refusal(e), String::new()), own.as_ref());
        }
        let approval = outcome.approval.as_ref().map(|a| &a[..]);
        let response = validate::respond(
            &self.request,
            &outcome.code,
            approval,
            &outcome.private_data,
        );
        self.state = State::Done;
        Step::Reply(Reply {
            code: outcome.code,
            response,
        })
    }

    /// What this request added to the counters (read once it replied).
    pub fn counts(&self) -> Counts {
        self.counts
    }

    /// Time spent waiting for appends to be durable, microseconds.
    pub fn journal_us(&self) -> u64 {
        self.journal_us
    }

    /// The acquirer sent to last, and its round trip in microseconds.
    pub fn acquirer(&self) -> Option<(AcquirerIndex, u64)> {
        self.acquirer
    }

    /// When the switch read the request.
    pub fn received(&self) -> Now {
        self.received
    }

    fn on_verdict(&mut self, verdict: ShardVerdict, now: Now, acquirers: &[String]) -> Step {
        match verdict {
            ShardVerdict::Duplicate(original) => {
                self.counts.duplicate = true;
                self.state = State::AwaitingOriginal;
                Step::AwaitOriginal(original)
            }
            ShardVerdict::Fresh {
                scoring,
                route,
                original,
                transaction,
            } => {
                let fresh = Fresh {
                    scoring,
                    route,
                    original,
                    transaction,
                };
                if self.claims {
                    self.state = State::Claiming(fresh);
                    return Step::Claim;
                }
                self.decide(fresh, now, acquirers)
            }
            ShardVerdict::Reversal { own, original } => {
                self.on_gateway_reversal(own, original, now, acquirers)
            }
            // Reached no acquirer and did nothing, but its 91 is journaled: a copy of
            // the request (a network duplicate, a retransmission sent before the 91
            // arrived) that comes after a crash must get the same 91 from the rebuilt
            // window, not be authorized behind the gateway's back (the simulator found
            // it). One record, the request carrying its answer, in the group commit.
            ShardVerdict::Shed(own) => {
                let answer = Answer::new(
                    ResponseCode::IssuerInoperative,
                    crate::ingress::SHED_TAGS.to_string(),
                );
                if self.journal_failed {
                    return self.reply(answer, Some(&own));
                }
                let mut record = self.journaled_request();
                record.code = code_str(&answer.code);
                record.private_data = answer.private_data.clone();
                self.append_since = Some(now);
                self.state = State::JournalingResponse {
                    answer,
                    original: Some(own),
                };
                Step::Append(vec![record])
            }
        }
    }

    /// The cluster's claim is made: decide the request (this node's), answer it from
    /// the node that claimed it first, or refuse it (no claim could be made).
    fn on_claimed(&mut self, fresh: Fresh, claim: Claim, now: Now, acquirers: &[String]) -> Step {
        match claim {
            Claim::Won => self.decide(fresh, now, acquirers),
            Claim::Theirs(outcome) => {
                self.counts.duplicate = true;
                self.on_original_for(outcome, Some(fresh.original), now)
            }
            Claim::Failed => {
                let answer = Answer::new(
                    ResponseCode::IssuerInoperative,
                    "claim=unavailable".to_string(),
                );
                self.finish(answer, Some(fresh.original), now, acquirers)
            }
        }
    }

    /// A new authorization, this node's to decide: declined by the fraud decision, no
    /// route, or on to its first acquirer.
    fn decide(&mut self, fresh: Fresh, now: Now, acquirers: &[String]) -> Step {
        let Fresh {
            scoring,
            route,
            original,
            transaction,
        } = fresh;
        {
            {
                // What velocity needs to be rebuilt from the journal at a restart.
                self.record.event_ms = transaction.timestamp_ms;
                self.record.mcc = transaction.mcc;
                self.record.country = transaction.country;
                self.record.pos_entry_mode = transaction.pos_entry_mode;
                self.record.decision = scoring.decision_str().to_string();
                self.record.score = scoring.score;
                if let Some(model) = &scoring.model {
                    self.record.model = model.id().to_string();
                }
                let tags = scoring.tags();
                if scoring.decision == Decision::Decline {
                    let answer = Answer::new(ResponseCode::SuspectedFraud, tags);
                    return self.finish(answer, Some(original), now, acquirers);
                }
                let Some(route) = route else {
                    let answer = Answer::new(ResponseCode::NoRoute, tags);
                    return self.finish(answer, Some(original), now, acquirers);
                };
                let routing = Routing {
                    tags,
                    route: route.acquirers,
                    position: 0,
                    original,
                    stand_in: route.stand_in,
                    approved: scoring.decision == Decision::Approve,
                };
                self.try_acquirer(routing)
            }
        }
    }

    /// A gateway's 0400/0420: the original's acquirer gets a reversal through the
    /// store-and-forward queue (at most once per original); the gateway is answered once
    /// it is durably queued.
    fn on_gateway_reversal(
        &mut self,
        own: Arc<Original>,
        original: Option<Arc<Original>>,
        now: Now,
        acquirers: &[String],
    ) -> Step {
        let nothing = || Answer::new(ResponseCode::Approved, "reversal=nothing_to_reverse".into());
        let Some(original) = original else {
            let answer = Answer::new(ResponseCode::UnableToLocateOriginal, String::new());
            return self.finish(answer, Some(own), now, acquirers);
        };
        if original.forwarded().is_none() {
            // Declined or refused by the switch itself: nothing was authorized.
            return self.finish(nothing(), Some(own), now, acquirers);
        }
        if let Some(outcome) = original.outcome_now() {
            if outcome.code != *b"00" && outcome.code != *b"91" {
                // Declined by the acquirer: nothing to reverse there.
                return self.finish(nothing(), Some(own), now, acquirers);
            }
        }
        let tag = if original.reversal_claimed() {
            "reversal=already_queued"
        } else {
            "reversal=queued"
        };
        let answer = Answer::new(ResponseCode::Approved, tag.into());
        self.reverse_then(original, answer, Some(own), now, acquirers)
    }

    fn try_acquirer(&mut self, routing: Routing) -> Step {
        let acquirer = routing.acquirer();
        self.state = State::Reserving(routing);
        Step::Reserve(acquirer)
    }

    fn next_acquirer(&mut self, mut routing: Routing, now: Now, acquirers: &[String]) -> Step {
        routing.position += 1;
        if routing.position < routing.route.len() {
            return self.try_acquirer(routing);
        }
        // No acquirer took it, and none was sent it (a send without an answer never
        // comes here: it is reversed and answered 91).
        if let Some(rule) = routing.stand_in {
            if !self.journal_failed
                && rule.admits(
                    self.record.amount_minor,
                    routing.approved,
                    self.record.score,
                )
            {
                return self.stand_in(routing, now, acquirers);
            }
            self.counts.stand_in_refused = true;
        }
        let answer = Answer::new(ResponseCode::IssuerInoperative, routing.tags);
        self.finish(answer, Some(routing.original), now, acquirers)
    }

    /// Approves on the issuer's behalf: one `advice_queued` record, the answer (marked
    /// `stand_in=1`) and the advice owed to the route's first acquirer at once, is durable
    /// before the answer. One record, not a response and an advice: a crash that keeps
    /// the first of two unsynced records would leave an approval the acquirer never hears
    /// of (the simulator found it, seed 85).
    fn stand_in(&mut self, routing: Routing, now: Now, acquirers: &[String]) -> Step {
        let acquirer = routing.route[0];
        let name = &acquirers[acquirer];
        let approval = stand_in_approval_code(&self.record);
        let answer = Answer {
            code: *b"00",
            approval: Some(approval),
            private_data: format!("{};stand_in=1;advice={name}", routing.tags),
        };
        let mut advice = self.follow_up(RecordKind::AdviceQueued, now);
        advice.acquirer = name.clone();
        advice.code = code_str(&answer.code);
        advice.approval_code = String::from_utf8_lossy(&approval).into_owned();
        advice.private_data = answer.private_data.clone();
        advice.switch_us = now.since(self.received);
        let step = self.append(vec![advice.clone()], now);
        self.state = State::JournalingStandIn {
            answer,
            original: routing.original,
            acquirer,
            advice,
        };
        step
    }

    /// A stand-in approval and its advice are durable: hand the advice to the queue, then
    /// answer. Not durable: nothing was approved, the answer is the journal's refusal.
    fn on_stand_in_durable(
        &mut self,
        answer: Answer,
        original: Arc<Original>,
        acquirer: AcquirerIndex,
        mut advice: Record,
        durable: Result<u64, JournalError>,
    ) -> Step {
        if let Err(e) = self.durable(durable) {
            self.counts.journal_refused = true;
            let refusal = Answer::new(journal_refusal(e), String::new());
            return self.reply(refusal, Some(&original));
        }
        advice.request_seq = self.request_seq;
        advice.request_back = 0;
        let mut stood_in = Forwarded::stand_in(acquirer, self.request_seq, &advice);
        stood_in.token = self.token;
        original.set_forwarded(stood_in);
        original.mark_settled();
        self.counts.stand_in_approved = true;
        let pending = PendingReversal {
            owed: Owed::Advice,
            request_seq: self.request_seq,
            acquirer,
            original: advice,
            stan: None,
            attempts: 0,
            entry: Some(Arc::clone(&original)),
            token: self.token,
            // The stand-in answer and its advice are one durable record.
            settled: true,
            queued_token: 0,
            journaled: true,
        };
        self.state = State::QueueingAdvice { answer, original };
        Step::QueueReversal(pending)
    }

    /// Journals a reversal of `original` as queued and hands it to the queue, unless one
    /// is already under way (or it was never forwarded); then answers `then`, recording
    /// it on `answered` (or on `original` when `answered` is `None`).
    fn reverse_then(
        &mut self,
        original: Arc<Original>,
        then: Answer,
        answered: Option<Arc<Original>>,
        now: Now,
        acquirers: &[String],
    ) -> Step {
        let answered = answered.or_else(|| Some(Arc::clone(&original)));
        let Some(pending) = claim(&original, acquirers) else {
            return self.finish(then, answered, now, acquirers);
        };
        if self.journal_failed {
            // The journal has stopped: the reversal goes from memory.
            self.counts.reversals_queued += 1;
            self.state = State::QueueingReversal {
                then,
                original: answered,
            };
            return Step::QueueReversal(pending);
        }
        let mut queued = pending.original.follow_up(
            RecordKind::ReversalQueued,
            pending.request_seq,
            now.unix_ms(),
        );
        queued.acquirer = pending.original.acquirer.clone();
        queued.link_stan = pending.original.link_stan;
        let step = self.append(vec![queued], now);
        self.state = State::JournalingReversal {
            pending,
            then,
            original: answered,
        };
        step
    }

    /// Journals the response (with the request, if it is not journaled yet), then
    /// answers; or answers at once when the journal has failed for this request.
    fn finish(
        &mut self,
        answer: Answer,
        original: Option<Arc<Original>>,
        now: Now,
        acquirers: &[String],
    ) -> Step {
        if self.journal_failed {
            return self.reply(answer, original.as_ref());
        }
        let mut response = self.follow_up(RecordKind::Response, now);
        response.code = code_str(&answer.code);
        if let Some(approval) = &answer.approval {
            response.approval_code = String::from_utf8_lossy(approval).into_owned();
        }
        response.private_data = answer.private_data.clone();
        let acquirer_us = self.acquirer.map_or(0, |(_, us)| us);
        response.switch_us = now.since(self.received).saturating_sub(acquirer_us);
        if let Some((acquirer, round_trip)) = self.acquirer {
            response.acquirer = acquirers[acquirer].clone();
            response.acquirer_us = round_trip;
        }
        let step = self.append(vec![response], now);
        self.state = State::JournalingResponse { answer, original };
        step
    }

    /// Records the outcome for retransmissions and builds the reply.
    fn reply(&mut self, answer: Answer, original: Option<&Arc<Original>>) -> Step {
        if let Some(original) = original {
            original.set_outcome(answer.outcome());
        }
        let approval = answer.approval.as_ref().map(|a| &a[..]);
        let response =
            validate::respond(&self.request, &answer.code, approval, &answer.private_data);
        self.state = State::Done;
        Step::Reply(Reply {
            code: answer.code,
            response,
        })
    }

    /// The request record as journaled: without the sealed PAN, which only the records a
    /// reversal or advice is built from carry (`Record::follow_up`).
    fn journaled_request(&self) -> Record {
        Record {
            pan_sealed: None,
            ..self.record.clone()
        }
    }

    /// A follow-up record of the request.
    fn follow_up(&self, kind: RecordKind, now: Now) -> Record {
        let mut record = self.record.follow_up(kind, self.request_seq, now.unix_ms());
        if self.request_seq == 0 {
            record.request_back = 1;
        }
        record
    }

    /// Asks for `records` to be appended, after the request record if that is not
    /// journaled yet.
    fn append(&mut self, mut records: Vec<Record>, now: Now) -> Step {
        debug_assert!(!self.journal_failed, "nothing is appended after a failure");
        if self.request_seq == 0 {
            for (i, record) in records.iter_mut().enumerate() {
                // This request's own follow-ups name it by distance; a record about
                // another request (a reversal queued for the original) keeps its number.
                if record.request_seq == 0 {
                    record.request_back = u8::try_from(i + 1).unwrap_or(u8::MAX);
                }
            }
            records.insert(0, self.journaled_request());
        }
        self.append_since = Some(now);
        Step::Append(records)
    }

    /// Takes an append's result: the request's sequence number the first time.
    fn durable(&mut self, durable: Result<u64, JournalError>) -> Result<(), JournalError> {
        match durable {
            Ok(first) => {
                if self.request_seq == 0 {
                    // Without a journal `first` is 0; keep a placeholder so the request
                    // is not journaled again.
                    self.request_seq = first.max(1);
                }
                Ok(())
            }
            Err(e) => {
                self.journal_failed = true;
                Err(e)
            }
        }
    }
}

/// The reversal of `original`, if it was forwarded and nobody has taken on its reversal.
fn claim(original: &Original, acquirers: &[String]) -> Option<PendingReversal> {
    let forwarded = original.forwarded()?;
    if !original.claim_reversal() {
        return None;
    }
    Some(PendingReversal {
        owed: Owed::Reversal,
        request_seq: forwarded.request_seq,
        acquirer: forwarded.acquirer,
        original: forwarded.record(&acquirers[forwarded.acquirer]),
        stan: None,
        attempts: 0,
        entry: None,
        token: forwarded.token,
        settled: original.settled(),
        queued_token: 0,
        journaled: false,
    })
}

/// The approval code (38) of a stand-in approval: `S` and five characters `0-9A-Z` drawn
/// from the request's identity, so the same request always gets the same code and the
/// acquirer and the gateway can tell the switch's approvals from the issuer's.
pub fn stand_in_approval_code(record: &Record) -> [u8; 6] {
    const BASE36: &[u8; 36] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ";
    // FNV-1a over the request's key fields.
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for part in [
        &record.terminal,
        &record.stan,
        &record.rrn,
        &record.transmission_time,
    ] {
        for &b in part.as_bytes().iter().chain(b"|") {
            hash = (hash ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    let mut code = *b"S00000";
    for slot in code[1..].iter_mut() {
        *slot = BASE36[(hash % 36) as usize];
        hash /= 36;
    }
    code
}

fn relay(answer: &Message, tags: String) -> Answer {
    let Some(code) = validate::acquirer_code(answer) else {
        return Answer::new(ResponseCode::SystemMalfunction, tags);
    };
    let approval = (code == *b"00")
        .then(|| validate::acquirer_approval_code(answer))
        .flatten()
        .and_then(|a| <[u8; 6]>::try_from(a).ok());
    Answer {
        code,
        approval,
        private_data: tags,
    }
}

/// Field 48's tags with the acquirer that took the request, appended in place.
fn with_tag(mut tags: String, tag: &str) -> String {
    if !tags.is_empty() {
        tags.push(';');
    }
    tags.push_str(tag);
    tags
}

fn with_acquirer(mut tags: String, acquirer: &str) -> String {
    tags.push_str(";acquirer=");
    tags.push_str(acquirer);
    tags
}

/// The code for a request the journal could not take: 91 while the disk or the
/// replicated stream is behind or unreachable (try again), 96 once the journal has
/// stopped.
pub fn journal_refusal(e: JournalError) -> ResponseCode {
    match e {
        JournalError::Overloaded | JournalError::Unreplicated => ResponseCode::IssuerInoperative,
        JournalError::Failed | JournalError::Encode => ResponseCode::SystemMalfunction,
    }
}

fn code_str(code: &[u8; 2]) -> String {
    String::from_utf8_lossy(code).into_owned()
}

fn state_name(state: &State) -> &'static str {
    match state {
        State::Start(_) => "Start",
        State::Refused(_) => "Refused",
        State::Reserving(_) => "Reserve",
        State::JournalingForward { .. } => "Append(forwarded)",
        State::Sending { .. } => "Send",
        State::JournalingReversal { .. } => "Append(reversal_queued)",
        State::QueueingReversal { .. }
        | State::QueueingUnjournaled(_)
        | State::QueueingAdvice { .. } => "QueueReversal",
        State::JournalingStandIn { .. } => "Append(stand-in response, advice_queued)",
        State::JournalingResponse { .. } => "Append(response)",
        State::AwaitingOriginal => "AwaitOriginal",
        State::JournalingDuplicate(..) => "Append(duplicate response)",
        State::Claiming(_) => "Claim",
        State::Done => "Reply",
    }
}

fn unexpected(step: &str, event: &Event) -> ! {
    panic!(
        "lifecycle: event {} does not answer step {step}",
        event.name()
    )
}

#[cfg(test)]
mod tests;
