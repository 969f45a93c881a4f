//! The switch node in the simulator: a second driver for the same state machines the
//! switch runs (`crate::switch` is the first), over simulated streams, shards, a
//! group-committing journal on the simulated disk, and acquirer links.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::sync::Arc;

use bytes::Bytes;
use payswitch_protocol::{fields, Message, Stan};
use rand::rngs::StdRng;
use rand::Rng;

use super::disk::Disk;
use super::peers::{Mode, RequestId, Time, MS, SECOND};
use super::Env;
use crate::acquirer::REVERSAL_SLOTS_PER_LINK;
use crate::breaker::{Admit, Breaker, BreakerConfig, Transition};
use crate::config::Config;
use crate::ingress::{self, Admission};
use crate::journal::{JournalError, PanKey, PanVault, Record, RecordKind};
use crate::lifecycle::{self, Event, Lifecycle, Now, Step};
use crate::recovery::Replay;
use crate::reversal::{Delivered, Delivery, DeliveryEvent, DeliveryStep, Owed, PendingReversal};
use crate::routing::{AcquirerWeights, Router};
use crate::scoring::rules::RuleSet;
use crate::scoring::{EventTime, Scoring};
use crate::shard::duplicates::{DupKey, DuplicateWindow, Original};
use crate::shard::{Shard, ShardRequest, ShardStats};

/// A bug planted in this driver, to show that the invariants catch what it breaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bug {
    /// Tells a lifecycle its records are durable as soon as they are written, before the
    /// group commit syncs them: a crash can then forget a request that was sent.
    DurableBeforeSync,
}

/// The node's sizes and costs.
#[derive(Debug, Clone, Copy)]
pub struct NodeConfig {
    /// Gateways (one pipelined stream each).
    pub gateways: usize,
    /// Acquirers.
    pub acquirers: usize,
    /// Shards.
    pub shards: usize,
    /// Requests a stream may have in progress before the switch stops reading it.
    pub stream_limit: usize,
    /// Requests waiting for one shard; beyond it 91 at once.
    pub shard_queue: usize,
    /// Journal submissions waiting for the sync; beyond it 91.
    pub journal_queue: usize,
    /// Acquirer timeout.
    pub timeout: Time,
    /// Requests outstanding per acquirer link.
    pub max_in_flight: usize,
    /// Duplicate window, milliseconds.
    pub window_ms: i64,
    /// Requests remembered per shard.
    pub window_capacity: usize,
    /// CPU time to read, decode and validate a frame.
    pub ingress_cost: Time,
    /// A shard's time for one decision.
    pub shard_cost: Time,
}

/// Who waits for a journal sync or an acquirer's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Owner {
    /// A request's lifecycle.
    Life(u64),
    /// A reversal's delivery.
    Delivery(u64),
}

/// The node's own events, each for one incarnation (`epoch`) of the node.
// Simulator events, moved once each: boxing the answers would only cost allocations.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum NodeEvent {
    /// The CPU is done reading a frame.
    Ingress {
        epoch: u32,
        request: RequestId,
        gateway: usize,
        sent_at: Time,
        /// Within the stream's bound; otherwise read to be shed.
        admitted: bool,
    },
    /// A shard finished its current job.
    ShardReady { epoch: u32, shard: usize },
    /// A group commit reached the disk.
    Synced {
        epoch: u32,
        point: usize,
        batch: Vec<(Owner, u64)>,
    },
    /// An acquirer's answer reaches the switch on connection `connection`.
    FromAcquirer {
        epoch: u32,
        acquirer: usize,
        connection: u64,
        answer: Message,
    },
    /// A request's timeout at its acquirer.
    Timeout {
        epoch: u32,
        acquirer: usize,
        stan: u32,
        owner: Owner,
    },
    /// A reversal delivery's back-off is over.
    Wake { epoch: u32, delivery: u64 },
    /// A reversal attempt's timeout.
    DeliveryTimeout {
        epoch: u32,
        delivery: u64,
        attempt: u32,
    },
    /// A retransmission gave up waiting for its original.
    WaitExpired { epoch: u32, life: u64 },
    /// The switch notices an acquirer's connection is gone.
    LinkDown(usize),
    /// The switch reconnects to an acquirer.
    LinkUp(usize),
}

struct Live {
    life: Lifecycle,
    gateway: usize,
    request: RequestId,
    sent_at: Time,
    /// Within its stream's bound (else read to be shed).
    admitted: bool,
    reservation: Option<(usize, Stan)>,
    original: Option<Arc<Original>>,
}

struct LiveDelivery {
    delivery: Delivery,
    /// The reversal's STAN on its link, held for the whole delivery.
    stan: Stan,
    reserved: bool,
    /// An answer that came while the delivery was journaling: taken at its next wait.
    answer: Option<Message>,
}

struct Job {
    request: ShardRequest,
    key: crate::shard::duplicates::DupKey,
    received_ms: i64,
    message: Message,
    record: Record,
    gateway: usize,
    id: RequestId,
    sent_at: Time,
    received: Now,
    admitted: bool,
}

struct SimShard {
    shard: Shard,
    queue: VecDeque<Job>,
    busy: bool,
}

struct Link {
    up: bool,
    /// The same breaker as the switch's links, on simulated time.
    breaker: Breaker,
    /// What the breaker said to each reservation not yet sent, by STAN.
    admits: BTreeMap<u32, Admit>,
    /// When each outstanding request left, and what the breaker said to it.
    sent: BTreeMap<u32, (u64, Admit)>,
    connection: u64,
    in_flight: usize,
    next_stan: u32,
    outstanding: BTreeMap<u32, Owner>,
    /// Reversals being delivered, by their STAN: answers to any attempt reach them.
    watches: BTreeMap<u32, u64>,
    /// Reversal attempts out now, at most `REVERSAL_SLOTS_PER_LINK`.
    reversals_in_flight: usize,
}

impl Link {
    fn new(timeout: Time) -> Link {
        Link {
            up: false,
            breaker: Breaker::new(BreakerConfig::default(), timeout / MS),
            admits: BTreeMap::new(),
            sent: BTreeMap::new(),
            connection: 0,
            in_flight: 0,
            next_stan: 0,
            outstanding: BTreeMap::new(),
            watches: BTreeMap::new(),
            reversals_in_flight: 0,
        }
    }
}

/// The breaker's clock: simulated microseconds.
fn breaker_now(at: Time) -> u64 {
    at
}

impl Link {
    /// The same STAN sequence as the switch's links, skipping STANs held.
    fn allocate_stan(&mut self) -> Stan {
        loop {
            let stan = crate::acquirer::link_stan(self.next_stan);
            self.next_stan = self.next_stan.wrapping_add(1);
            if !self.outstanding.contains_key(&stan.get())
                && !self.watches.contains_key(&stan.get())
            {
                return stan;
            }
        }
    }

    /// A STAN for a reversal's whole delivery: `wanted` when free.
    fn watch(&mut self, wanted: Option<Stan>, delivery: u64) -> Stan {
        let stan = match wanted {
            Some(stan)
                if !self.outstanding.contains_key(&stan.get())
                    && !self.watches.contains_key(&stan.get()) =>
            {
                stan
            }
            _ => self.allocate_stan(),
        };
        self.watches.insert(stan.get(), delivery);
        stan
    }
}

#[derive(Default)]
struct Stream {
    in_progress: usize,
    /// Requests read beyond the bound, to be shed: at most the bound again.
    shedding: usize,
    /// Frames not read yet: the serve loop stops reading when both are full.
    backlog: VecDeque<(RequestId, Time)>,
}

#[derive(Default)]
struct JournalState {
    pending: Vec<(Owner, u64)>,
    syncing: bool,
}

/// The switch: state that survives a crash (the disk) and state that does not.
pub struct Node {
    config: NodeConfig,
    bug: Option<Bug>,
    /// Incarnation: events of an earlier one are ignored.
    epoch: u32,
    up: bool,
    disk: Disk,
    pan_key: PanKey,
    /// Seals PANs into the journal, as the switch does with a PAN key file: reversals and
    /// advices carry field 2, which the simulated acquirers check.
    vault: PanVault,
    router: Router,
    /// The links' health for balanced routes, as the switch's links publish it.
    weights: Arc<AcquirerWeights>,
    names: Vec<String>,
    scoring: Arc<Scoring>,
    shards: Vec<SimShard>,
    lives: BTreeMap<u64, Live>,
    deliveries: BTreeMap<u64, LiveDelivery>,
    /// Requests with a delivery in progress, and the deliveries waiting to follow it, as
    /// the switch's queue keeps them (a reversal of a stand-in approval after its advice).
    active: BTreeMap<u64, VecDeque<PendingReversal>>,
    next_id: u64,
    links: Vec<Link>,
    streams: Vec<Stream>,
    cpu_free: Time,
    journal: JournalState,
    waiting: Vec<u64>,
}

/// Unix microseconds of simulated time `at`.
fn now_of(at: Time) -> Now {
    Now {
        unix_us: super::EPOCH_S * 1_000_000 + at as i64,
    }
}

impl Node {
    /// A node that has never run, on an empty disk.
    pub fn new(config: NodeConfig, rng: &mut StdRng, bug: Option<Bug>) -> Node {
        let names: Vec<String> = (0..config.acquirers).map(|i| format!("acq{i}")).collect();
        let mut toml = String::from("[listen]\ntcp = \"127.0.0.1:0\"\n");
        for name in &names {
            toml.push_str(&format!(
                "[[acquirers]]\nname = \"{name}\"\naddress = \"127.0.0.1:9\"\n"
            ));
        }
        // Visa-like cards to the first acquirer, falling back to the last, approved in
        // stand-in up to 100.00 when neither can be reached; others shared
        // between the two by their health (a balanced route), each falling back to the
        // other.
        let last = &names[names.len() - 1];
        toml.push_str(&format!(
            "[[routes]]\nbins = [\"4\"]\nacquirers = [\"{}\", \"{last}\"]\nstand_in = {{ max_amount_minor = 10000 }}\n[[routes]]\nbins = [\"5\"]\nacquirers = [\"{last}\", \"{}\"]\nbalance = true\n",
            names[0], names[0]
        ));
        let parsed: Config = toml::from_str(&toml).expect("the simulator's configuration parses");
        let router = parsed.router().expect("the simulator's routes resolve");
        Node {
            config,
            bug,
            epoch: 0,
            up: false,
            disk: Disk::new(),
            pan_key: PanKey::from_bytes(rng.gen()),
            // A fixed key: the simulator needs no secret, and its random stream stays as it was.
            vault: PanVault::from_keys(&[(1, [0x5e; 32])]).expect("one key"),
            router,
            weights: Arc::new(AcquirerWeights::new(names.len())),
            names,
            scoring: Arc::new(new_scoring()),
            shards: Vec::new(),
            lives: BTreeMap::new(),
            deliveries: BTreeMap::new(),
            active: BTreeMap::new(),
            next_id: 0,
            links: Vec::new(),
            streams: Vec::new(),
            cpu_free: 0,
            journal: JournalState::default(),
            waiting: Vec::new(),
        }
    }

    /// Whether the node is running.
    pub fn is_up(&self) -> bool {
        self.up
    }

    /// Reversals being delivered.
    pub fn deliveries(&self) -> usize {
        self.deliveries.len()
    }

    /// The answers the journal holds, as (terminal, RRN, MTI, code) of the request each
    /// answered.
    pub fn journaled_answers(&self) -> Result<HashSet<(String, String, String, String)>, String> {
        let records = self.disk.records().map_err(|e| format!("{e:?}"))?;
        Ok(records
            .into_iter()
            // A shed request's answer is on its request record.
            .filter(|r| {
                // A stand-in answer's is its advice_queued record.
                matches!(r.kind, RecordKind::Response | RecordKind::AdviceQueued)
                    || (r.kind == RecordKind::Request && !r.code.is_empty())
            })
            .map(|r| (r.terminal, r.rrn, r.mti, r.code))
            .collect())
    }

    /// A line about the first reversal still being delivered.
    pub fn first_delivery(&self) -> String {
        let Some(live) = self.deliveries.values().next() else {
            return String::new();
        };
        let reversal = live.delivery.reversal();
        let link = &self.links[reversal.acquirer];
        format!(
            "first: acquirer {} (link {}, {} in flight of {}), RRN {}, {} attempts",
            reversal.acquirer,
            if link.up { "up" } else { "down" },
            link.in_flight,
            self.config.max_in_flight,
            reversal.original.rrn,
            live.delivery.attempts()
        )
    }

    /// Checks the node's memory against its bounds; the first one exceeded, if any.
    pub fn check_bounds(&self) -> Option<String> {
        let c = &self.config;
        // Admitted and read to be shed, each up to the stream's bound.
        let requests = c.gateways * 2 * c.stream_limit;
        if self.lives.len() > requests {
            return Some(format!(
                "{} requests in progress, above {} streams x {} each",
                self.lives.len(),
                c.gateways,
                2 * c.stream_limit
            ));
        }
        if self.deliveries.len() > crate::reversal::MAX_PENDING_REVERSALS {
            return Some(format!("{} reversals in delivery", self.deliveries.len()));
        }
        if self.journal.pending.len() > c.journal_queue {
            return Some(format!(
                "{} journal submissions waiting",
                self.journal.pending.len()
            ));
        }
        for (i, shard) in self.shards.iter().enumerate() {
            if shard.shard.window_len() > c.window_capacity {
                return Some(format!(
                    "shard {i} remembers {} requests",
                    shard.shard.window_len()
                ));
            }
            if shard.queue.len() > c.shard_queue {
                return Some(format!("shard {i} has {} queued", shard.queue.len()));
            }
        }
        for (i, link) in self.links.iter().enumerate() {
            if link.in_flight > c.max_in_flight {
                return Some(format!("acquirer {i}: {} in flight", link.in_flight));
            }
        }
        None
    }

    /// Starts (or restarts) the node from its disk, as `crate::switch::start` does.
    pub fn start(&mut self, env: &mut Env) {
        self.epoch += 1;
        self.up = true;
        let now = now_of(env.now);
        let mut replay = Replay::new(
            now.unix_ms() - self.config.window_ms,
            &self.names,
            self.config.window_capacity * self.config.shards,
        );
        let report = match self.disk.replay(|seq, record| replay.record(seq, record)) {
            Ok(report) => report,
            Err(e) => {
                env.violate(
                    "journal contiguous",
                    format!("the journal does not read back: {e:?}"),
                );
                return;
            }
        };
        let mut recovery = replay.finish(report);
        self.scoring = Arc::new(new_scoring());
        self.shards = self.new_shards(std::mem::take(&mut recovery.recent));
        self.lives.clear();
        self.deliveries.clear();
        self.active.clear();
        self.waiting.clear();
        self.journal = JournalState::default();
        self.links = (0..self.config.acquirers)
            .map(|_| Link::new(self.config.timeout))
            .collect();
        // A restarted switch starts with every acquirer healthy, as the real one does.
        for acquirer in 0..self.config.acquirers {
            self.weights.set(acquirer, 1_000);
        }
        self.streams = (0..self.config.gateways)
            .map(|_| Stream::default())
            .collect();
        self.cpu_free = env.now;
        // In-doubt authorizations are queued for reversal durably before anything else.
        let queued = recovery.in_doubt_records(now.unix_ms());
        if !queued.is_empty() {
            self.disk.write(&queued);
            let point = self.disk.written();
            self.disk.synced_to(point);
        }
        for (acquirer, link) in self.links.iter_mut().enumerate() {
            if let Some(stan) = recovery.highest_wanted_stan(acquirer) {
                link.next_stan = stan.get();
            }
        }
        for pending in recovery.pending.into_iter().chain(recovery.in_doubt) {
            self.start_delivery(pending, env);
        }
        for acquirer in 0..self.config.acquirers {
            let after = env.rng.gen_range(50 * MS..2 * SECOND);
            env.schedule(after, super::Event::Node(NodeEvent::LinkUp(acquirer)));
        }
    }

    /// Fresh shards, their duplicate windows holding what the journal remembers.
    fn new_shards(&self, recent: Vec<(u128, DupKey, i64, Arc<Original>)>) -> Vec<SimShard> {
        let window = std::time::Duration::from_millis(self.config.window_ms as u64);
        let mut shards: Vec<SimShard> = (0..self.config.shards)
            .map(|_| SimShard {
                shard: Shard::new(
                    10_000,
                    DuplicateWindow::new(window, self.config.window_capacity),
                    Arc::new(ShardStats::default()),
                    Arc::clone(&self.weights),
                ),
                queue: VecDeque::new(),
                busy: false,
            })
            .collect();
        for (pan_hash, key, at_ms, original) in recent {
            let shard = crate::shard::shard_of(pan_hash, self.config.shards);
            shards[shard].shard.remember(key, at_ms, original);
        }
        shards
    }

    /// The node dies: everything but the disk is gone, and of the disk what was synced
    /// (and perhaps some of what was not, possibly torn).
    pub fn crash(&mut self, env: &mut Env) {
        self.up = false;
        self.epoch += 1;
        if self.disk.crash(&mut env.rng) {
            env.counts.torn_writes += 1;
        }
        self.lives.clear();
        self.deliveries.clear();
        self.waiting.clear();
        self.shards.clear();
        self.links.clear();
        self.streams.clear();
        self.journal = JournalState::default();
    }

    /// A transmission of `request` reaches the switch.
    pub fn receive(&mut self, env: &mut Env, request: RequestId, sent_at: Time) {
        if !self.up {
            return; // Refused: the gateway retransmits after its timer.
        }
        let gateway = env.gateways.requests[request].gateway;
        let stream = &mut self.streams[gateway];
        // Beyond the stream's bound a request is read to be shed (91 unless its shard
        // knows it), as the switch's serve loop does; beyond twice the bound it waits.
        let limit = self.config.stream_limit;
        if stream.in_progress < limit {
            self.read(env, gateway, request, sent_at, true);
        } else if stream.shedding < limit {
            self.read(env, gateway, request, sent_at, false);
        } else {
            stream.backlog.push_back((request, sent_at));
        }
    }

    fn read(
        &mut self,
        env: &mut Env,
        gateway: usize,
        request: RequestId,
        sent_at: Time,
        admitted: bool,
    ) {
        let stream = &mut self.streams[gateway];
        if admitted {
            stream.in_progress += 1;
        } else {
            stream.shedding += 1;
        }
        self.cpu_free = self.cpu_free.max(env.now) + self.config.ingress_cost;
        let after = self.cpu_free - env.now;
        let epoch = self.epoch;
        env.schedule(
            after,
            super::Event::Node(NodeEvent::Ingress {
                epoch,
                request,
                gateway,
                sent_at,
                admitted,
            }),
        );
    }

    /// One of the node's own events.
    pub fn handle(&mut self, env: &mut Env, event: NodeEvent) {
        if !self.up {
            return;
        }
        match event {
            NodeEvent::Ingress {
                epoch,
                request,
                gateway,
                sent_at,
                admitted,
            } if epoch == self.epoch => self.ingress(env, request, gateway, sent_at, admitted),
            NodeEvent::ShardReady { epoch, shard } if epoch == self.epoch => {
                self.shard_ready(env, shard)
            }
            NodeEvent::Synced {
                epoch,
                point,
                batch,
            } if epoch == self.epoch => self.synced(env, point, batch),
            NodeEvent::FromAcquirer {
                epoch,
                acquirer,
                connection,
                answer,
            } if epoch == self.epoch => self.acquirer_answered(env, acquirer, connection, answer),
            NodeEvent::Timeout {
                epoch,
                acquirer,
                stan,
                owner,
            } if epoch == self.epoch => {
                let link = &mut self.links[acquirer];
                if link.outstanding.get(&stan) == Some(&owner) {
                    link.outstanding.remove(&stan);
                    link.in_flight -= 1;
                    if let Some((_, admit)) = link.sent.remove(&stan) {
                        let transition = link.breaker.failed(breaker_now(env.now), admit);
                        self.weights.set(acquirer, link.breaker.success_permille());
                        count_transition(env, transition);
                    }
                    self.resume(env, owner, Resumed::NoAnswer);
                }
            }
            // Not when an earlier attempt's answer ended the wait.
            NodeEvent::Wake { epoch, delivery }
                if epoch == self.epoch
                    && self
                        .deliveries
                        .get(&delivery)
                        .is_some_and(|live| live.delivery.is_sleeping()) =>
            {
                self.resume(env, Owner::Delivery(delivery), Resumed::Woke);
            }
            NodeEvent::DeliveryTimeout {
                epoch,
                delivery,
                attempt,
            } if epoch == self.epoch => {
                let out = self.deliveries.get(&delivery).is_some_and(|live| {
                    live.delivery.is_sending() && live.delivery.attempts() == attempt
                });
                if out {
                    self.end_attempt(delivery);
                    self.resume(env, Owner::Delivery(delivery), Resumed::NoAnswer);
                }
            }
            NodeEvent::WaitExpired { epoch, life } if epoch == self.epoch => {
                if let Some(position) = self.waiting.iter().position(|w| *w == life) {
                    self.waiting.remove(position);
                    self.resume(env, Owner::Life(life), Resumed::Original(None));
                }
            }
            // Noticed late: only if the acquirer is still gone (it may be back already).
            NodeEvent::LinkDown(acquirer) if env.acquirers[acquirer].mode == Mode::Down => {
                self.link_down(env, acquirer)
            }
            NodeEvent::LinkDown(_) => {}
            // A connection can only be made to an acquirer that is there.
            NodeEvent::LinkUp(acquirer) if env.acquirers[acquirer].mode == Mode::Down => {}
            NodeEvent::LinkUp(acquirer) => {
                let link = &mut self.links[acquirer];
                if !link.up {
                    link.up = true;
                    link.connection += 1;
                }
            }
            _ => {} // An earlier incarnation's.
        }
    }

    /// A group commit reached the disk: everyone in it hears their records are durable.
    fn synced(&mut self, env: &mut Env, point: usize, batch: Vec<(Owner, u64)>) {
        self.disk.synced_to(point);
        self.journal.syncing = false;
        for (owner, first) in batch {
            if self.bug != Some(Bug::DurableBeforeSync) {
                self.resume(env, owner, Resumed::Durable(Ok(first)));
            }
        }
        if !self.journal.pending.is_empty() {
            self.start_sync(env);
        }
    }

    /// An acquirer's answer: to whoever waits for its STAN on that connection, if anyone.
    fn acquirer_answered(
        &mut self,
        env: &mut Env,
        acquirer: usize,
        connection: u64,
        answer: Message,
    ) {
        let link = &mut self.links[acquirer];
        if !link.up || link.connection != connection {
            return; // The connection it came on is gone.
        }
        let stan = answer
            .get(fields::STAN)
            .and_then(|s| Stan::parse(s).ok())
            .map(|s| s.get());
        let Some(stan) = stan else {
            return;
        };
        if let Some(owner) = link.outstanding.remove(&stan) {
            link.in_flight -= 1;
            if let Some((sent_at, admit)) = link.sent.remove(&stan) {
                let now = breaker_now(env.now);
                let transition = link.breaker.answered(now, now - sent_at, admit);
                self.weights.set(acquirer, link.breaker.success_permille());
                count_transition(env, transition);
            }
            self.resume(env, owner, Resumed::Answered(answer));
            return;
        }
        let Some(&id) = link.watches.get(&stan) else {
            // After its timeout: matched to nothing, as the real link does.
            env.counts.late_answers += 1;
            return;
        };
        // A reversal's answer, to this attempt or an earlier one.
        let Some(live) = self.deliveries.get_mut(&id) else {
            return;
        };
        if live.delivery.is_sending() {
            self.end_attempt(id);
            self.resume(env, Owner::Delivery(id), Resumed::Answered(answer));
        } else if live.delivery.is_sleeping() {
            self.resume(env, Owner::Delivery(id), Resumed::Answered(answer));
        } else {
            // Journaling: taken at the next wait, as the switch's channel holds it.
            live.answer.get_or_insert(answer);
        }
    }

    /// A reversal attempt is over: its place on the link is free.
    fn end_attempt(&mut self, delivery: u64) {
        let Some(live) = self.deliveries.get_mut(&delivery) else {
            return;
        };
        if std::mem::take(&mut live.reserved) {
            let acquirer = live.delivery.reversal().acquirer;
            self.links[acquirer].reversals_in_flight -= 1;
        }
    }

    /// The connection to an acquirer is gone: everything outstanding on it is lost.
    fn link_down(&mut self, env: &mut Env, acquirer: usize) {
        let link = &mut self.links[acquirer];
        if !link.up {
            return;
        }
        link.up = false;
        link.connection += 1;
        let lost: Vec<Owner> = std::mem::take(&mut link.outstanding)
            .into_values()
            .collect();
        link.in_flight -= lost.len();
        for (_, admit) in std::mem::take(&mut link.sent).into_values() {
            let transition = link.breaker.failed(breaker_now(env.now), admit);
            self.weights.set(acquirer, link.breaker.success_permille());
            count_transition(env, transition);
        }
        for owner in lost {
            self.resume(env, owner, Resumed::NoAnswer);
        }
    }

    fn ingress(
        &mut self,
        env: &mut Env,
        id: RequestId,
        gateway: usize,
        sent_at: Time,
        admitted: bool,
    ) {
        let frame: Bytes = env.gateways.requests[id].frame.clone();
        let received = now_of(env.now);
        match ingress::admit(Message::decode_prefix(frame), || {}) {
            Admission::Close => {
                env.violate(
                    "answered",
                    format!("request {id}: the switch could not read the simulator's frame"),
                );
            }
            Admission::Answer(code, response) => {
                let reply = lifecycle::Reply { code, response };
                self.replied(env, gateway, id, sent_at, admitted, &reply);
            }
            Admission::Admit {
                request,
                auth,
                reversal,
                key,
            } => {
                let pan_hash = self.pan_key.hash(auth.pan.expose());
                let received_ms = received.unix_ms();
                let shard_request = ShardRequest::new(
                    &request,
                    auth,
                    pan_hash,
                    reversal,
                    !admitted,
                    &self.scoring,
                    received_ms,
                );
                let mut record = Lifecycle::request_record(&request, &auth, pan_hash, received);
                record.pan_sealed = Some(self.vault.seal(auth.pan.expose(), pan_hash));
                let job = Job {
                    request: shard_request,
                    key,
                    received_ms,
                    message: request,
                    record,
                    gateway,
                    id,
                    sent_at,
                    received,
                    admitted,
                };
                let index = crate::shard::shard_of(pan_hash, self.shards.len());
                let shard = &mut self.shards[index];
                if shard.queue.len() >= self.config.shard_queue {
                    let life = Lifecycle::refused(
                        job.message,
                        job.record,
                        received,
                        payswitch_protocol::ResponseCode::IssuerInoperative,
                    );
                    self.begin(env, life, gateway, id, sent_at, admitted);
                    return;
                }
                shard.queue.push_back(job);
                if !shard.busy {
                    shard.busy = true;
                    let epoch = self.epoch;
                    env.schedule(
                        self.config.shard_cost,
                        super::Event::Node(NodeEvent::ShardReady {
                            epoch,
                            shard: index,
                        }),
                    );
                }
            }
        }
    }

    fn shard_ready(&mut self, env: &mut Env, index: usize) {
        let shard = &mut self.shards[index];
        let Some(job) = shard.queue.pop_front() else {
            shard.busy = false;
            return;
        };
        let (verdict, _) = shard.shard.decide(
            job.request,
            job.key,
            job.received_ms,
            &self.router,
            &self.scoring,
            false,
        );
        if shard.queue.is_empty() {
            shard.busy = false;
        } else {
            let epoch = self.epoch;
            env.schedule(
                self.config.shard_cost,
                super::Event::Node(NodeEvent::ShardReady {
                    epoch,
                    shard: index,
                }),
            );
        }
        let life = Lifecycle::new(job.message, job.record, job.received, verdict);
        self.begin(env, life, job.gateway, job.id, job.sent_at, job.admitted);
    }

    fn begin(
        &mut self,
        env: &mut Env,
        mut life: Lifecycle,
        gateway: usize,
        id: RequestId,
        sent_at: Time,
        admitted: bool,
    ) {
        self.next_id += 1;
        let life_id = self.next_id;
        let step = life.start(now_of(env.now), &self.names);
        let live = Live {
            life,
            gateway,
            request: id,
            sent_at,
            admitted,
            reservation: None,
            original: None,
        };
        self.pump_life(env, life_id, live, step);
    }

    /// Carries out a lifecycle's steps until one has to wait; keeps it if it waits.
    fn pump_life(&mut self, env: &mut Env, id: u64, mut live: Live, mut step: Step) {
        loop {
            let event = match step {
                Step::Reply(reply) => {
                    // Reserved and never sent (the journal refused the forwarded record).
                    if let Some((acquirer, stan)) = live.reservation.take() {
                        self.release(acquirer, stan);
                    }
                    self.replied(
                        env,
                        live.gateway,
                        live.request,
                        live.sent_at,
                        live.admitted,
                        &reply,
                    );
                    self.wake_waiters(env);
                    return;
                }
                Step::Append(records) => match self.append(env, Owner::Life(id), &records) {
                    Some(durable) => Event::Durable(durable),
                    None => break,
                },
                Step::Reserve(acquirer) => match self.reserve(env, acquirer) {
                    Some(stan) => {
                        live.reservation = Some((acquirer, stan));
                        Event::Reserved(stan)
                    }
                    None => Event::Unavailable,
                },
                Step::Send { acquirer, stan } => {
                    let reserved = live.reservation.take();
                    assert_eq!(
                        reserved,
                        Some((acquirer, stan)),
                        "sent with the STAN reserved"
                    );
                    if self.send(env, Owner::Life(id), acquirer, stan, live.life.request()) {
                        break;
                    }
                    Event::NotSent
                }
                Step::QueueReversal(pending) => {
                    self.start_delivery(pending, env);
                    Event::Queued
                }
                // The simulator's nodes share no cluster: every claim is theirs to win.
                Step::Claim => Event::Claimed(crate::lifecycle::Claim::Won),
                Step::AwaitOriginal(original) => match original.outcome_now() {
                    Some(outcome) => Event::Original(Some(outcome.clone())),
                    None => {
                        live.original = Some(original);
                        self.waiting.push(id);
                        let epoch = self.epoch;
                        env.schedule(
                            lifecycle::DUPLICATE_WAIT_MS * MS,
                            super::Event::Node(NodeEvent::WaitExpired { epoch, life: id }),
                        );
                        break;
                    }
                },
            };
            step = live.life.handle(event, now_of(env.now), &self.names);
        }
        self.lives.insert(id, live);
    }

    /// Lifecycles waiting for an original that now has its outcome get it.
    fn wake_waiters(&mut self, env: &mut Env) {
        if self.waiting.is_empty() {
            return;
        }
        let ready: Vec<u64> = self
            .waiting
            .iter()
            .copied()
            .filter(|id| {
                self.lives
                    .get(id)
                    .and_then(|l| l.original.as_ref())
                    .is_some_and(|o| o.outcome_now().is_some())
            })
            .collect();
        self.waiting.retain(|id| !ready.contains(id));
        for id in ready {
            let outcome = self.lives[&id]
                .original
                .as_ref()
                .and_then(|o| o.outcome_now().cloned());
            self.resume(env, Owner::Life(id), Resumed::Original(outcome));
        }
    }

    /// A request's reply: the stream reads on, and the answer goes back over the network.
    fn replied(
        &mut self,
        env: &mut Env,
        gateway: usize,
        id: RequestId,
        sent_at: Time,
        admitted: bool,
        reply: &lifecycle::Reply,
    ) {
        let waited = env.now - sent_at;
        if waited > super::GATEWAY_DEADLINE {
            env.violate(
                "answered",
                format!(
                    "request {id} answered {:.1}s after the gateway sent it (deadline {}s)",
                    waited as f64 / SECOND as f64,
                    super::GATEWAY_DEADLINE / SECOND
                ),
            );
        }
        let stream = &mut self.streams[gateway];
        if admitted {
            stream.in_progress -= 1;
        } else {
            stream.shedding -= 1;
        }
        if let Some((next, next_sent)) = stream.backlog.pop_front() {
            self.receive(env, next, next_sent);
        }
        let shed = reply.response.get(fields::PRIVATE_DATA) == Some(ingress::SHED_TAGS.as_bytes());
        if shed {
            env.counts.shed += 1;
        }
        let tags = reply.response.get_str(fields::PRIVATE_DATA).unwrap_or("");
        if tags.contains("stand_in=1") && !tags.contains("dup=1") {
            env.counts.stand_in += 1;
        }
        let answer = super::peers::Answer {
            code: reply.code,
            tags: reply
                .response
                .get_str(fields::PRIVATE_DATA)
                .unwrap_or("")
                .to_string(),
        };
        env.answer_gateway(id, answer);
    }

    /// Appends for `owner`: `Some` when the answer is immediate (the queue is full, or
    /// the planted bug), `None` when it comes with the next sync.
    fn append(
        &mut self,
        env: &mut Env,
        owner: Owner,
        records: &[Record],
    ) -> Option<Result<u64, JournalError>> {
        if self.journal.pending.len() >= self.config.journal_queue {
            return Some(Err(JournalError::Overloaded));
        }
        let first = self.disk.write(records);
        self.journal.pending.push((owner, first));
        if !self.journal.syncing {
            self.start_sync(env);
        }
        (self.bug == Some(Bug::DurableBeforeSync)).then_some(Ok(first))
    }

    fn start_sync(&mut self, env: &mut Env) {
        let batch = std::mem::take(&mut self.journal.pending);
        let point = self.disk.written();
        self.journal.syncing = true;
        let latency = if env.rng.gen_bool(0.02) {
            env.rng.gen_range(20 * MS..120 * MS)
        } else {
            env.rng.gen_range(100..2 * MS)
        };
        let epoch = self.epoch;
        env.schedule(
            latency,
            super::Event::Node(NodeEvent::Synced {
                epoch,
                point,
                batch,
            }),
        );
    }

    fn reserve(&mut self, env: &mut Env, acquirer: usize) -> Option<Stan> {
        let link = &mut self.links[acquirer];
        if !link.up {
            return None;
        }
        let (admit, transition) = link.breaker.admit(breaker_now(env.now));
        self.weights.set(acquirer, link.breaker.success_permille());
        count_transition(env, transition);
        if admit == Admit::No {
            env.counts.breaker_refused += 1;
            return None;
        }
        if link.in_flight >= self.config.max_in_flight {
            link.breaker.not_sent(admit);
            return None;
        }
        link.in_flight += 1;
        let stan = link.allocate_stan();
        link.admits.insert(stan.get(), admit);
        Some(stan)
    }

    /// A reservation given back unused.
    fn release(&mut self, acquirer: usize, stan: Stan) {
        let link = &mut self.links[acquirer];
        link.in_flight -= 1;
        if let Some(admit) = link.admits.remove(&stan.get()) {
            link.breaker.not_sent(admit);
        }
    }

    /// Sends `message` with `stan` on the link; `false` when the link is down (nothing
    /// sent, the place given back).
    fn send(
        &mut self,
        env: &mut Env,
        owner: Owner,
        acquirer: usize,
        stan: Stan,
        message: &Message,
    ) -> bool {
        let link = &mut self.links[acquirer];
        let admit = link.admits.remove(&stan.get()).unwrap_or(Admit::Yes);
        if !link.up {
            link.in_flight -= 1;
            link.breaker.not_sent(admit);
            return false;
        }
        let now = breaker_now(env.now);
        link.breaker.sent(now);
        link.sent.insert(stan.get(), (now, admit));
        let mut builder = message.to_builder();
        builder
            .set(fields::STAN, &stan.to_digits())
            .expect("a STAN fits field 11");
        let previous = link.outstanding.insert(stan.get(), owner);
        assert!(previous.is_none(), "switch STAN reused while outstanding");
        let connection = link.connection;
        let epoch = self.epoch;
        env.send_acquirer(acquirer, builder.build(), epoch, connection);
        env.schedule(
            self.config.timeout,
            super::Event::Node(NodeEvent::Timeout {
                epoch,
                acquirer,
                stan: stan.get(),
                owner,
            }),
        );
        true
    }

    fn start_delivery(&mut self, pending: PendingReversal, env: &mut Env) {
        if let Some(waiting) = self.active.get_mut(&pending.request_seq) {
            waiting.push_back(pending);
            return;
        }
        if self.deliveries.len() >= crate::reversal::MAX_PENDING_REVERSALS {
            return; // Left in the journal for the next start, as the switch does.
        }
        self.active.insert(pending.request_seq, VecDeque::new());
        let Some(mut delivery) = Delivery::new(pending, now_of(env.now), Some(&self.vault)) else {
            env.violate(
                "reversals converge",
                "a queued reversal cannot be built".into(),
            );
            return;
        };
        self.next_id += 1;
        let id = self.next_id;
        let acquirer = delivery.reversal().acquirer;
        let stan = self.links[acquirer].watch(delivery.stan(), id);
        let step = delivery.start();
        self.pump_delivery(
            env,
            id,
            LiveDelivery {
                delivery,
                stan,
                reserved: false,
                answer: None,
            },
            step,
        );
    }

    fn pump_delivery(
        &mut self,
        env: &mut Env,
        id: u64,
        mut live: LiveDelivery,
        mut step: DeliveryStep,
    ) {
        loop {
            let event = match step {
                DeliveryStep::Done(done) => {
                    let reversal = live.delivery.reversal();
                    let advice = reversal.owed == Owed::Advice;
                    if done == Delivered::Acknowledged {
                        if advice {
                            env.counts.advices_acknowledged += 1;
                        } else {
                            env.counts.reversals_acknowledged += 1;
                        }
                    }
                    let (acquirer, request_seq) = (reversal.acquirer, reversal.request_seq);
                    self.links[acquirer].watches.remove(&live.stan.get());
                    // Left for the next start: what waits stays in the journal too.
                    let mut waiting = self.active.remove(&request_seq).unwrap_or_default();
                    if done == Delivered::Acknowledged {
                        if let Some(mut next) = waiting.pop_front() {
                            if advice {
                                next.original.link_stan = live.stan.get();
                            }
                            self.start_delivery(next, env);
                            if let Some(queue) = self.active.get_mut(&request_seq) {
                                queue.extend(waiting);
                            }
                        }
                    }
                    return;
                }
                DeliveryStep::Reserve { acquirer, .. } => {
                    let link = &mut self.links[acquirer];
                    if link.up && link.reversals_in_flight < REVERSAL_SLOTS_PER_LINK {
                        link.reversals_in_flight += 1;
                        live.reserved = true;
                        DeliveryEvent::Reserved(live.stan)
                    } else {
                        DeliveryEvent::Unavailable
                    }
                }
                DeliveryStep::Append(records) => {
                    match self.append(env, Owner::Delivery(id), &records) {
                        Some(durable) => DeliveryEvent::Durable(durable),
                        None => break,
                    }
                }
                DeliveryStep::Send { acquirer, stan } => {
                    assert!(live.reserved, "sent on a place reserved");
                    assert_eq!(stan, live.stan, "every attempt carries the reversal's STAN");
                    if let Some(entry) = &live.delivery.reversal().entry {
                        entry.set_advice_stan(stan);
                    }
                    let link = &mut self.links[acquirer];
                    if !link.up {
                        link.reversals_in_flight -= 1;
                        live.reserved = false;
                        DeliveryEvent::NoAnswer
                    } else if let Some(answer) = live.answer.take() {
                        // An earlier attempt's answer is already here.
                        link.reversals_in_flight -= 1;
                        live.reserved = false;
                        DeliveryEvent::Answered(answer)
                    } else {
                        let mut builder = live.delivery.message().to_builder();
                        builder
                            .set(fields::STAN, &stan.to_digits())
                            .expect("a STAN fits field 11");
                        let connection = link.connection;
                        let epoch = self.epoch;
                        env.send_acquirer(acquirer, builder.build(), epoch, connection);
                        env.schedule(
                            self.config.timeout,
                            super::Event::Node(NodeEvent::DeliveryTimeout {
                                epoch,
                                delivery: id,
                                attempt: live.delivery.attempts(),
                            }),
                        );
                        break;
                    }
                }
                DeliveryStep::Sleep(ms) => {
                    if live.reserved {
                        // An attempt that did not leave gives its place back.
                        let acquirer = live.delivery.reversal().acquirer;
                        self.links[acquirer].reversals_in_flight -= 1;
                        live.reserved = false;
                    }
                    if let Some(answer) = live.answer.take() {
                        DeliveryEvent::Answered(answer)
                    } else {
                        let epoch = self.epoch;
                        env.schedule(
                            ms * MS,
                            super::Event::Node(NodeEvent::Wake {
                                epoch,
                                delivery: id,
                            }),
                        );
                        break;
                    }
                }
            };
            step = live.delivery.handle(event, now_of(env.now));
        }
        self.deliveries.insert(id, live);
    }

    /// Hands `what` to the lifecycle or delivery `owner` that waits for it.
    fn resume(&mut self, env: &mut Env, owner: Owner, what: Resumed) {
        let now = now_of(env.now);
        match owner {
            Owner::Life(id) => {
                let Some(mut live) = self.lives.remove(&id) else {
                    return;
                };
                let event = match what {
                    Resumed::Durable(durable) => Event::Durable(durable),
                    Resumed::Answered(answer) => Event::Answered(answer),
                    Resumed::NoAnswer => Event::NoAnswer,
                    Resumed::Original(outcome) => Event::Original(outcome),
                    Resumed::Woke => unreachable!("lifecycles do not sleep"),
                };
                let step = live.life.handle(event, now, &self.names);
                self.pump_life(env, id, live, step);
            }
            Owner::Delivery(id) => {
                let Some(mut live) = self.deliveries.remove(&id) else {
                    return;
                };
                let event = match what {
                    Resumed::Durable(durable) => DeliveryEvent::Durable(durable),
                    Resumed::Answered(answer) => DeliveryEvent::Answered(answer),
                    Resumed::NoAnswer => DeliveryEvent::NoAnswer,
                    Resumed::Woke => DeliveryEvent::Woke,
                    Resumed::Original(_) => unreachable!("deliveries wait for no original"),
                };
                let step = live.delivery.handle(event, now);
                self.pump_delivery(env, id, live, step);
            }
        }
    }
}

/// What a waiting lifecycle or delivery is handed.
#[allow(clippy::large_enum_variant)]
enum Resumed {
    Durable(Result<u64, JournalError>),
    Answered(Message),
    NoAnswer,
    Original(Option<crate::shard::duplicates::Outcome>),
    Woke,
}

fn new_scoring() -> Scoring {
    let rules = RuleSet::load(None, crate::scoring::rule_variables())
        .expect("no rules file: nothing to fail");
    // A budget no simulated scoring exceeds: the decision must not depend on how fast
    // the machine running the simulator is.
    Scoring::new(
        Arc::new(rules),
        std::time::Duration::from_secs(3600),
        EventTime::Clock,
        10_000,
    )
}

/// Counts a breaker's opening in the run's figures.
fn count_transition(env: &mut Env, transition: Option<Transition>) {
    if let Some(Transition::Opened { .. }) = transition {
        env.counts.breaker_opened += 1;
    }
}
