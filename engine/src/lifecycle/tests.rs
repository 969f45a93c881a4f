//! The lifecycle's decisions, step by step, without a socket or a clock.

use super::*;
use crate::scoring::Verdict;
use payswitch_protocol::Mti;

const ACQUIRERS: [&str; 2] = ["visa", "mastercard"];

fn names() -> Vec<String> {
    ACQUIRERS.iter().map(|s| s.to_string()).collect()
}

fn at(ms: i64) -> Now {
    Now {
        unix_us: 1_796_000_000_000_000 + ms * 1000,
    }
}

fn message(mti: Mti, stan: &str, original_data: Option<&str>) -> Message {
    let mut b = Message::builder(mti);
    b.set_str(2, "4111111111111111").unwrap();
    b.set_str(3, "000000").unwrap();
    b.set_str(4, "000000001250").unwrap();
    b.set_str(7, "1125123045").unwrap();
    b.set_str(11, stan).unwrap();
    b.set_str(37, "533012000001").unwrap();
    b.set_str(41, "TERM0001").unwrap();
    b.set_str(42, "MERCHANT0000001").unwrap();
    b.set_str(49, "840").unwrap();
    if let Some(data) = original_data {
        b.set_str(90, data).unwrap();
    }
    b.build()
}

fn approve() -> Verdict {
    Verdict {
        decision: Decision::Approve,
        score: None,
        model: None,
        rule: None,
        reasons: Vec::new(),
    }
}

fn lifecycle(request: Message, verdict: ShardVerdict, now: Now) -> Lifecycle {
    let auth = validate::validate(&request).expect("a valid request");
    let record = Lifecycle::request_record(&request, &auth, 7, now);
    Lifecycle::new(request, record, now, verdict)
}

fn fresh(original: &Arc<Original>) -> ShardVerdict {
    fresh_with(original, None)
}

fn fresh_with(original: &Arc<Original>, stand_in: Option<StandIn>) -> ShardVerdict {
    ShardVerdict::Fresh {
        scoring: approve(),
        route: Some(crate::routing::Route {
            acquirers: Arc::from(vec![0, 1]),
            stand_in,
        }),
        original: Arc::clone(original),
        transaction: payswitch_models::features::Transaction {
            timestamp_ms: 1_796_000_000_000,
            card: 7,
            amount_minor: 1_250,
            currency: 840,
            mcc: 5411,
            merchant: 1,
            terminal: 2,
            country: 840,
            pos_entry_mode: 51,
        },
    }
}

/// Stands in for up to 12.50 (the test request's amount is exactly that).
const STAND_IN: StandIn = StandIn {
    max_amount_minor: 1_250,
    max_score: None,
};

fn answer(request: &Message, code: &str) -> Message {
    let mut b = validate::respond(request, &[code.as_bytes()[0], code.as_bytes()[1]], None, "")
        .to_builder();
    if code == "00" {
        b.set_str(38, "A1B2C3").unwrap();
    }
    b.build()
}

/// A journal that numbers records from 1, as the writer does.
#[derive(Default)]
struct Books {
    records: Vec<Record>,
}

impl Books {
    fn append(&mut self, records: Vec<Record>) -> Event {
        let first = self.records.len() as u64 + 1;
        self.records.extend(records);
        Event::Durable(Ok(first))
    }

    fn kinds(&self) -> Vec<RecordKind> {
        self.records.iter().map(|r| r.kind).collect()
    }
}

/// Runs `life` from `step` until it asks for something `world` does not answer (an
/// `AwaitOriginal` or a `Send`, returned) or replies.
fn run_until_wait(
    life: &mut Lifecycle,
    mut step: Step,
    books: &mut Books,
    queued: &mut Vec<PendingReversal>,
    now: Now,
) -> Step {
    loop {
        let event = match step {
            Step::Append(records) => books.append(records),
            Step::Reserve(_) => Event::Reserved(Stan::new(42).unwrap()),
            Step::QueueReversal(pending) => {
                queued.push(pending);
                Event::Queued
            }
            step @ (Step::Send { .. } | Step::AwaitOriginal(_) | Step::Reply(_) | Step::Claim) => {
                return step
            }
        };
        step = life.handle(event, now, &names());
    }
}

/// The request `life` sent gets no answer within its timeout (2 s): its reply, once the
/// steps that follow are done.
fn time_out(life: &mut Lifecycle, books: &mut Books, queued: &mut Vec<PendingReversal>) -> Reply {
    let step = life.handle(Event::NoAnswer, at(2_000), &names());
    replied(run_until_wait(life, step, books, queued, at(2_000)))
}

fn replied(step: Step) -> Reply {
    match step {
        Step::Reply(reply) => reply,
        step => panic!("expected a reply, got {step:?}"),
    }
}

#[test]
fn forwarded_is_durable_before_the_send_and_the_response_before_the_reply() {
    let names = names();
    let request = message(Mti::AUTHORIZATION_REQUEST, "000001", None);
    let original = Arc::new(Original::new());
    let mut life = lifecycle(request.clone(), fresh(&original), at(0));
    let Step::Reserve(0) = life.start(at(0), &names) else {
        panic!("the route's first acquirer is reserved first")
    };
    let Step::Append(records) = life.handle(Event::Reserved(Stan::new(9).unwrap()), at(1), &names)
    else {
        panic!("the forwarded record is appended before anything is sent")
    };
    let kinds: Vec<_> = records.iter().map(|r| r.kind).collect();
    assert_eq!(kinds, [RecordKind::Request, RecordKind::Forwarded]);
    assert_eq!(records[1].link_stan, 9);
    assert_eq!(records[1].acquirer, "visa");
    let Step::Send { acquirer: 0, stan } = life.handle(Event::Durable(Ok(5)), at(2), &names) else {
        panic!("sent once durable")
    };
    assert_eq!(stan.get(), 9);
    assert_eq!(original.forwarded().unwrap().request_seq, 5);
    let Step::Append(records) =
        life.handle(Event::Answered(answer(&request, "00")), at(10), &names)
    else {
        panic!("the response is journaled before the reply")
    };
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].kind, RecordKind::Response);
    assert_eq!(records[0].request_seq, 5);
    assert_eq!(records[0].acquirer_us, 8_000);
    assert!(
        original.outcome_now().is_none(),
        "no outcome before it is durable"
    );
    let reply = replied(life.handle(Event::Durable(Ok(7)), at(11), &names));
    assert_eq!(&reply.code, b"00");
    assert_eq!(reply.response.get_str(38), Some("A1B2C3"));
    assert!(reply
        .response
        .get_str(48)
        .unwrap()
        .ends_with(";acquirer=visa"));
    assert_eq!(&original.outcome_now().unwrap().code, b"00");
    assert_eq!(life.journal_us(), 2_000);
}

#[test]
fn a_journal_that_fails_before_the_send_sends_nothing() {
    let names = names();
    let request = message(Mti::AUTHORIZATION_REQUEST, "000001", None);
    let original = Arc::new(Original::new());
    let mut life = lifecycle(request, fresh(&original), at(0));
    let _reserve = life.start(at(0), &names);
    let _append = life.handle(Event::Reserved(Stan::new(9).unwrap()), at(0), &names);
    let reply = replied(life.handle(Event::Durable(Err(JournalError::Failed)), at(0), &names));
    assert_eq!(&reply.code, b"96");
    assert!(original.forwarded().is_none());
    assert!(life.counts().journal_refused);
}

#[test]
fn an_unavailable_acquirer_is_followed_by_the_next_but_a_silent_one_never_is() {
    let names = names();
    let request = message(Mti::AUTHORIZATION_REQUEST, "000001", None);
    let original = Arc::new(Original::new());
    let mut life = lifecycle(request, fresh(&original), at(0));
    let _ = life.start(at(0), &names);
    let Step::Reserve(1) = life.handle(Event::Unavailable, at(0), &names) else {
        panic!("down or full: the next acquirer")
    };
    let mut books = Books::default();
    let mut queued = Vec::new();
    let step = life.handle(Event::Reserved(Stan::new(3).unwrap()), at(0), &names);
    let Step::Send { acquirer: 1, .. } =
        run_until_wait(&mut life, step, &mut books, &mut queued, at(0))
    else {
        panic!("sent to the second acquirer")
    };
    let reply = time_out(&mut life, &mut books, &mut queued);
    assert_eq!(&reply.code, b"91", "never sent to a third acquirer");
    assert_eq!(queued.len(), 1, "reversed once");
    assert_eq!(queued[0].acquirer, 1);
    assert_eq!(queued[0].original.link_stan, 3);
    assert_eq!(
        books.kinds(),
        [
            RecordKind::Request,
            RecordKind::Forwarded,
            RecordKind::ReversalQueued,
            RecordKind::Response
        ]
    );
}

/// The acquirer approves after the switch gave up: the gateway was told 91, and the
/// approval is reversed exactly once, whatever arrives after.
#[test]
fn an_approval_after_the_timeout_is_reversed_exactly_once() {
    let names = names();
    let request = message(Mti::AUTHORIZATION_REQUEST, "000001", None);
    let original = Arc::new(Original::new());
    let mut books = Books::default();
    let mut queued = Vec::new();
    let mut life = lifecycle(request.clone(), fresh(&original), at(0));
    let step = life.start(at(0), &names);
    let Step::Send { .. } = run_until_wait(&mut life, step, &mut books, &mut queued, at(0)) else {
        panic!("sent")
    };
    let reply = time_out(&mut life, &mut books, &mut queued);
    assert_eq!(&reply.code, b"91");
    assert_eq!(queued.len(), 1);
    // The gateway, told 91, reverses it too: already queued, not twice.
    let reversal = message(Mti::REVERSAL_REQUEST, "000002", None);
    let own = Arc::new(Original::new());
    let mut reversing = lifecycle(
        reversal,
        ShardVerdict::Reversal {
            own,
            original: Some(Arc::clone(&original)),
        },
        at(2_500),
    );
    let step = reversing.start(at(2_500), &names);
    let reply = replied(run_until_wait(
        &mut reversing,
        step,
        &mut books,
        &mut queued,
        at(2_500),
    ));
    assert_eq!(&reply.code, b"00");
    assert_eq!(reply.response.get_str(48), Some("reversal=already_queued"));
    assert_eq!(queued.len(), 1, "one reversal for one original");
    // A retransmission of the original gets its 91, never a second authorization.
    let mut retransmitted = lifecycle(
        request,
        ShardVerdict::Duplicate(Arc::clone(&original)),
        at(3_000),
    );
    let Step::AwaitOriginal(waited) = retransmitted.start(at(3_000), &names) else {
        panic!("answered from the original")
    };
    let step = retransmitted.handle(
        Event::Original(waited.outcome_now().cloned()),
        at(3_000),
        &names,
    );
    let reply = replied(run_until_wait(
        &mut retransmitted,
        step,
        &mut books,
        &mut queued,
        at(3_000),
    ));
    assert_eq!(&reply.code, b"91");
    assert_eq!(queued.len(), 1);
}

/// The gateway's 0400 arrives while the original is still out; then the original
/// times out. One reversal, whichever comes first.
#[test]
fn a_timeout_racing_the_gateways_reversal_reverses_once() {
    let names = names();
    let request = message(Mti::AUTHORIZATION_REQUEST, "000001", None);
    let original = Arc::new(Original::new());
    let mut books = Books::default();
    let mut queued = Vec::new();
    let mut life = lifecycle(request, fresh(&original), at(0));
    let step = life.start(at(0), &names);
    let Step::Send { .. } = run_until_wait(&mut life, step, &mut books, &mut queued, at(0)) else {
        panic!("sent")
    };
    let reversal = message(
        Mti::REVERSAL_REQUEST,
        "000002",
        Some("010000000111251230450000000000000000000000"),
    );
    let mut reversing = lifecycle(
        reversal,
        ShardVerdict::Reversal {
            own: Arc::new(Original::new()),
            original: Some(Arc::clone(&original)),
        },
        at(500),
    );
    let step = reversing.start(at(500), &names);
    let reply = replied(run_until_wait(
        &mut reversing,
        step,
        &mut books,
        &mut queued,
        at(500),
    ));
    assert_eq!(reply.response.get_str(48), Some("reversal=queued"));
    assert_eq!(queued.len(), 1);
    let reply = time_out(&mut life, &mut books, &mut queued);
    assert_eq!(&reply.code, b"91");
    assert_eq!(queued.len(), 1, "the timeout finds the reversal taken");
    assert_eq!(
        books
            .kinds()
            .iter()
            .filter(|k| **k == RecordKind::ReversalQueued)
            .count(),
        1
    );
}

/// A retransmission while the original is still at the acquirer waits for it and
/// gets its answer; nothing reaches an acquirer twice.
#[test]
fn with_no_acquirer_available_a_stand_in_route_approves_and_owes_an_advice() {
    let names = names();
    let request = message(Mti::AUTHORIZATION_REQUEST, "000001", None);
    let original = Arc::new(Original::new());
    let mut life = lifecycle(request, fresh_with(&original, Some(STAND_IN)), at(0));
    let _ = life.start(at(0), &names);
    let _ = life.handle(Event::Unavailable, at(0), &names);
    let Step::Append(records) = life.handle(Event::Unavailable, at(1), &names) else {
        panic!("the stand-in approval is journaled before anything else")
    };
    // One record is the answer and the advice owed: a crash cannot keep one without
    // the other.
    let kinds: Vec<_> = records.iter().map(|r| r.kind).collect();
    assert_eq!(kinds, [RecordKind::Request, RecordKind::AdviceQueued]);
    let advice = &records[1];
    assert_eq!(advice.code, "00");
    assert!(advice.approval_code.starts_with('S'), "{advice:?}");
    assert!(advice.private_data.contains("stand_in=1"));
    assert_eq!(advice.acquirer, "visa", "the route's first acquirer");
    assert_eq!(advice.request_back, 1);
    assert!(
        original.outcome_now().is_none(),
        "nothing before it is durable"
    );
    let Step::QueueReversal(pending) = life.handle(Event::Durable(Ok(10)), at(2), &names) else {
        panic!("the advice is queued once durable")
    };
    assert_eq!(pending.owed, Owed::Advice);
    assert_eq!((pending.request_seq, pending.acquirer), (10, 0));
    assert_eq!(pending.original.request_seq, 10);
    let reply = replied(life.handle(Event::Queued, at(2), &names));
    assert_eq!(&reply.code, b"00");
    assert_eq!(
        reply.response.get_str(38).unwrap().as_bytes(),
        stand_in_approval_code(&records[0])
    );
    assert!(reply
        .response
        .get_str(48)
        .unwrap()
        .contains("stand_in=1;advice=visa"));
    assert!(life.counts().stand_in_approved);
    // A reversal of it goes to the advice's acquirer, naming the advice.
    let forwarded = original.forwarded().expect("the stand-in is remembered");
    assert_eq!(forwarded.acquirer, 0);
    let record = forwarded.record("visa");
    assert_eq!((record.mti.as_str(), record.link_stan), ("0120", 0));
    original.set_advice_stan(Stan::new(77).unwrap());
    assert_eq!(original.forwarded().unwrap().link_stan.get(), 77);
}

#[test]
fn stand_in_refuses_what_its_rule_does_not_admit_and_never_follows_a_send() {
    let names = names();
    // Over the amount: 91, nothing owed.
    let small = StandIn {
        max_amount_minor: 1_249,
        ..STAND_IN
    };
    let request = message(Mti::AUTHORIZATION_REQUEST, "000001", None);
    let original = Arc::new(Original::new());
    let mut life = lifecycle(request, fresh_with(&original, Some(small)), at(0));
    let _ = life.start(at(0), &names);
    let _ = life.handle(Event::Unavailable, at(0), &names);
    let mut books = Books::default();
    let mut queued = Vec::new();
    let step = life.handle(Event::Unavailable, at(0), &names);
    let reply = replied(run_until_wait(
        &mut life,
        step,
        &mut books,
        &mut queued,
        at(0),
    ));
    assert_eq!(&reply.code, b"91");
    assert!(queued.is_empty());
    assert!(life.counts().stand_in_refused);
    assert_eq!(books.kinds(), [RecordKind::Request, RecordKind::Response]);

    // Sent, and no answer: the acquirer may have approved it. 91 and a reversal, never
    // a stand-in approval.
    let request = message(Mti::AUTHORIZATION_REQUEST, "000002", None);
    let original = Arc::new(Original::new());
    let mut life = lifecycle(request, fresh_with(&original, Some(STAND_IN)), at(0));
    let step = life.start(at(0), &names);
    let mut books = Books::default();
    let mut queued = Vec::new();
    let Step::Send { .. } = run_until_wait(&mut life, step, &mut books, &mut queued, at(0)) else {
        panic!("sent to the first acquirer")
    };
    let reply = time_out(&mut life, &mut books, &mut queued);
    assert_eq!(&reply.code, b"91");
    assert_eq!(queued.len(), 1);
    assert_eq!(queued[0].owed, Owed::Reversal);
    assert!(!life.counts().stand_in_approved);
}

#[test]
fn a_retransmission_while_the_original_is_out_gets_its_answer() {
    let names = names();
    let request = message(Mti::AUTHORIZATION_REQUEST, "000001", None);
    let original = Arc::new(Original::new());
    let mut books = Books::default();
    let mut queued = Vec::new();
    let mut life = lifecycle(request.clone(), fresh(&original), at(0));
    let step = life.start(at(0), &names);
    let Step::Send { .. } = run_until_wait(&mut life, step, &mut books, &mut queued, at(0)) else {
        panic!("sent")
    };
    let mut retransmitted = lifecycle(
        request.clone(),
        ShardVerdict::Duplicate(Arc::clone(&original)),
        at(100),
    );
    let Step::AwaitOriginal(waited) = retransmitted.start(at(100), &names) else {
        panic!("the retransmission waits for its original")
    };
    assert!(waited.outcome_now().is_none(), "still out");
    let step = life.handle(Event::Answered(answer(&request, "00")), at(300), &names);
    let first = replied(run_until_wait(
        &mut life,
        step,
        &mut books,
        &mut queued,
        at(300),
    ));
    let step = retransmitted.handle(
        Event::Original(waited.outcome_now().cloned()),
        at(300),
        &names,
    );
    let second = replied(run_until_wait(
        &mut retransmitted,
        step,
        &mut books,
        &mut queued,
        at(300),
    ));
    assert_eq!(first.code, second.code);
    assert_eq!(second.response.get_str(38), Some("A1B2C3"));
    let tags = second.response.get_str(48).unwrap();
    assert!(tags.ends_with(";dup=1"), "{tags}");
    assert!(retransmitted.counts().duplicate);
    let duplicate = books.records.last().unwrap();
    assert!(duplicate.duplicate);
    assert_eq!(duplicate.code, "00");
}

#[test]
#[should_panic(expected = "does not answer step")]
fn an_event_that_answers_another_step_is_a_driver_bug() {
    let names = names();
    let original = Arc::new(Original::new());
    let mut life = lifecycle(
        message(Mti::AUTHORIZATION_REQUEST, "000001", None),
        fresh(&original),
        at(0),
    );
    let _reserve = life.start(at(0), &names);
    let _ = life.handle(
        Event::Answered(message(Mti::AUTHORIZATION_REQUEST, "000009", None)),
        at(0),
        &names,
    );
}

#[test]
fn in_a_cluster_a_request_is_claimed_before_anything_is_decided_or_sent() {
    let names = names();
    let request = message(Mti::AUTHORIZATION_REQUEST, "000001", None);
    let original = Arc::new(Original::new());
    let mut life = lifecycle(request, fresh(&original), at(0)).with_claims();
    let Step::Claim = life.start(at(0), &names) else {
        panic!("claimed first")
    };
    let Step::Reserve(0) = life.handle(Event::Claimed(Claim::Won), at(1), &names) else {
        panic!("won: decided and routed as on a single node")
    };
}

#[test]
fn a_request_another_node_claimed_is_answered_from_its_answer_never_sent() {
    let names = names();
    let request = message(Mti::AUTHORIZATION_REQUEST, "000001", None);
    let original = Arc::new(Original::new());
    let mut life = lifecycle(request, fresh(&original), at(0)).with_claims();
    let step = life.start(at(0), &names);
    assert!(matches!(step, Step::Claim));
    let theirs = Outcome {
        code: *b"00",
        approval: Some(*b"A1B2C3"),
        private_data: "decision=approve;acquirer=visa".into(),
    };
    let Step::Append(records) = life.handle(
        Event::Claimed(Claim::Theirs(Some(theirs.clone()))),
        at(1),
        &names,
    ) else {
        panic!("the answer it gets is journaled")
    };
    let kinds: Vec<_> = records.iter().map(|r| r.kind).collect();
    assert_eq!(kinds, [RecordKind::Request, RecordKind::Response]);
    assert!(records[1].duplicate);
    assert_eq!(records[1].approval_code, "A1B2C3");
    let reply = replied(life.handle(Event::Durable(Ok(3)), at(2), &names));
    assert_eq!(&reply.code, b"00");
    assert_eq!(reply.response.get_str(38), Some("A1B2C3"));
    assert_eq!(
        reply.response.get_str(48),
        Some("decision=approve;acquirer=visa;dup=1")
    );
    assert!(life.counts().duplicate);
    // Its own window entry answers later copies at this node the same, without the
    // cluster (and without a second dup tag).
    assert_eq!(original.outcome_now(), Some(&theirs));
    assert!(original.forwarded().is_none(), "nothing was forwarded here");
}

#[test]
fn no_claim_no_decision_91() {
    let names = names();
    let request = message(Mti::AUTHORIZATION_REQUEST, "000001", None);
    let original = Arc::new(Original::new());
    let mut life = lifecycle(request, fresh(&original), at(0)).with_claims();
    life.start(at(0), &names);
    let Step::Append(records) = life.handle(Event::Claimed(Claim::Failed), at(1), &names) else {
        panic!("answered, journaled")
    };
    assert_eq!(records.last().unwrap().code, "91");
    let reply = replied(life.handle(Event::Durable(Ok(3)), at(2), &names));
    assert_eq!(&reply.code, b"91");
    assert_eq!(reply.response.get_str(48), Some("claim=unavailable"));
}

#[test]
fn a_fenced_send_is_answered_91_with_no_reversal_and_no_other_acquirer() {
    let names = names();
    let request = message(Mti::AUTHORIZATION_REQUEST, "000001", None);
    let original = Arc::new(Original::new());
    let mut life = lifecycle(request, fresh_with(&original, Some(STAND_IN)), at(0));
    life.start(at(0), &names);
    life.handle(Event::Reserved(Stan::new(9).unwrap()), at(1), &names);
    let Step::Send { .. } = life.handle(Event::Durable(Ok(5)), at(2), &names) else {
        panic!("sent once durable")
    };
    let Step::Append(records) = life.handle(Event::Fenced, at(3), &names) else {
        panic!("answered at once: neither the next acquirer nor a stand-in")
    };
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].kind, RecordKind::Response);
    assert_eq!(records[0].code, "91");
    assert!(records[0].acquirer.is_empty(), "no acquirer saw it");
    let reply = replied(life.handle(Event::Durable(Ok(6)), at(4), &names));
    assert_eq!(&reply.code, b"91");
    assert!(reply.response.get_str(48).unwrap().ends_with("fenced=1"));
    assert_eq!(life.counts().reversals_queued, 0);
}
